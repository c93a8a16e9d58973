'use strict';
// A small promise-based client of bertstream.v1.BertService for Node.js.
//
// The service definition is read at run time from the repository's protos/ folder with
// @grpc/proto-loader, so this file never drifts from the API the server serves.
//
//   const { BertClient } = require('./bertstream');
//   const bc = new BertClient('localhost:8001', { model: 'news-zh' });
//   const { vectors } = await bc.embed(['今天股市大涨']);   // [Float32Array(dim)]
//   await bc.embedStream(batches, { priority: 1 });   // an interactive stream: level 1
//   await bc.classify(['今天股市大涨'], { pairs: ['沪指收复三千点'] });   // a pair model
//   const { method, results } = await bc.rerank('股市', ['沪指收复三千点', '天气晴']);
//   bc.close();
//
// Text pairs: `pairs` beside `texts` (one second segment per text; text_pairs on the wire) is
// read as `[CLS] a [SEP] b [SEP]`; `truncationStrategy` (longest_first, only_first,
// only_second) says which half `truncate` cuts. A stream item {texts, pairs} carries its own.
//
// Every embed / classify / stream call takes `priority` (1 the highest level; 0, the default,
// lets the server decide: level 1 for a unary call of up to 16 texts, the model's lowest level
// for stream messages and larger calls) and `timeoutUs` (longest wait in the queue).
//
// Every call carries a deadline (timeout for unary calls, streamTimeout for streams). Failed
// calls reject with a BertstreamError carrying the gRPC `code`, its `codeName` and `details`.
//
// TLS and bearer tokens (server/security.py), as the Python client's channels.py:
//
//   new BertClient('bert.example.com:8001', {
//     tls: { ca: 'ca.crt', cert: 'client.crt', key: 'client.key' }, // cert+key: mutual TLS
//     token: process.env.BERTSTREAM_TOKEN,   // sent as `authorization: Bearer ...` per call
//   });

const fs = require('fs');
const os = require('os');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', '..', 'protos');
const PROTO_FILE = path.join(PROTO_ROOT, 'bertstream', 'v1', 'bertstream.proto');
const LOADER_OPTIONS = {
  keepCase: true, // field names as in the .proto: request_id, raw_values, ...
  longs: String, // int64/uint64 (version, timings) arrive as decimal strings
  enums: String, // POOLING_MEAN, ...
  defaults: true,
  oneofs: true,
  includeDirs: [PROTO_ROOT], // resolves `import "bertstream/v1/model_config.proto"`
};
const MiB = 1024 * 1024;
const CHANNEL_OPTIONS = {
  'grpc.max_receive_message_length': 256 * MiB,
  'grpc.max_send_message_length': 64 * MiB,
};

const POOLINGS = {
  mean: 'POOLING_MEAN',
  max: 'POOLING_MAX',
  cls: 'POOLING_CLS',
  mean_max: 'POOLING_MEAN_MAX',
  tokens: 'POOLING_TOKENS',
};
const DIRECTIONS = { right: 'TRUNCATION_DIRECTION_RIGHT', left: 'TRUNCATION_DIRECTION_LEFT' };
// Unset: the server's default (longest_first; only_second for Rerank, keeping the query whole).
const STRATEGIES = {
  longest_first: 'TRUNCATION_STRATEGY_LONGEST_FIRST',
  only_first: 'TRUNCATION_STRATEGY_ONLY_FIRST',
  only_second: 'TRUNCATION_STRATEGY_ONLY_SECOND',
};
const METHODS = { RERANK_METHOD_CROSS_ENCODER: 'cross_encoder', RERANK_METHOD_COSINE: 'cosine' };
const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([k, v]) => [v, k]));
const LITTLE_ENDIAN_HOST = os.endianness() === 'LE';

// What a metadata value may hold (printable ASCII); checked here so that grpc-js's own error,
// which quotes the value, never shows a token.
const TOKEN_PATTERN = /^[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?$/;

let cachedService = null;

/** The BertService constructor, loaded once per process. */
function loadService() {
  if (cachedService === null) {
    const definition = protoLoader.loadSync(PROTO_FILE, LOADER_OPTIONS);
    cachedService = grpc.loadPackageDefinition(definition).bertstream.v1.BertService;
  }
  return cachedService;
}

/** A failed call or stream item: `code` is the numeric gRPC status, `codeName` its name. */
class BertstreamError extends Error {
  constructor(code, details) {
    const codeName = CODE_NAMES[code] || 'UNKNOWN';
    super(`${codeName}: ${details}`);
    this.name = 'BertstreamError';
    this.code = code;
    this.codeName = codeName;
    this.details = details;
  }

  static fromGrpc(err) {
    if (err instanceof BertstreamError) return err;
    const code = typeof err.code === 'number' ? err.code : grpc.status.UNKNOWN;
    return new BertstreamError(code, err.details || err.message || '');
  }

  toJSON() {
    return { code: this.codeName, grpc_code: this.code, message: this.details };
  }
}

/**
 * One Embedding message as a Float32Array (row-major, shape `embedding.shape`). `raw` holds
 * little-endian float32 bytes when the request set raw_values; otherwise `values` is used.
 */
function decodeEmbedding(embedding) {
  const raw = embedding.raw;
  if (raw && raw.length > 0) {
    if (raw.length % 4 !== 0) {
      throw new BertstreamError(grpc.status.INTERNAL, `raw holds ${raw.length} bytes`);
    }
    const count = raw.length / 4;
    if (!LITTLE_ENDIAN_HOST) {
      const out = new Float32Array(count);
      for (let i = 0; i < count; i++) out[i] = raw.readFloatLE(i * 4);
      return out;
    }
    // A Float32Array view needs a 4-byte aligned offset; Buffers sliced from a decoded
    // message often are not, and the view must not outlive a pooled buffer either: copy.
    const copy = new Uint8Array(raw.length);
    copy.set(raw);
    return new Float32Array(copy.buffer, 0, count);
  }
  return Float32Array.from(embedding.values || []);
}

function parseEmbedding(embedding) {
  return {
    vector: decodeEmbedding(embedding),
    shape: (embedding.shape || []).map(Number),
    usage: embedding.usage,
  };
}

function toTexts(texts) {
  if (typeof texts === 'string') return [texts];
  if (!Array.isArray(texts)) throw new TypeError('texts must be a string or an array of strings');
  return texts.slice();
}

function pooling(name) {
  if (name === undefined || name === null || name === '') return 'POOLING_UNSPECIFIED';
  if (!(name in POOLINGS)) {
    throw new TypeError(`pooling must be one of ${Object.keys(POOLINGS).join(', ')}`);
  }
  return POOLINGS[name];
}

const MAX_PRIORITY = 2 ** 32 - 1; // uint32

/**
 * The request's priority level: 1 is the highest (Triton's numbering; a model has
 * `dynamic_batching { priority_levels }` of them, 2 by default, and the server refuses a level
 * the model does not have). 0 (the default): the server decides: level 1 for a unary call of
 * up to 16 texts, the model's default level (the lowest) for stream messages and larger calls.
 */
function priority(value) {
  if (value === undefined || value === null) return 0;
  if (!Number.isInteger(value) || value < 0 || value > MAX_PRIORITY) {
    throw new TypeError('priority must be an integer >= 0 (1 is the highest level; 0 lets '
      + `the server decide), not ${String(value)}`);
  }
  return value;
}

/**
 * timeoutUs: the longest the texts may wait in the server's queue, in microseconds, before
 * the call (or stream message) fails DEADLINE_EXCEEDED; 0 (the default): the level's queue
 * policy. A number (a safe integer), a BigInt or a decimal string; sent as a uint64 string.
 */
function timeoutUs(value) {
  if (value === undefined || value === null) return '0';
  const ok = (typeof value === 'number' && Number.isSafeInteger(value) && value >= 0)
    || (typeof value === 'bigint' && value >= 0n && value < 2n ** 64n)
    || (typeof value === 'string' && /^[0-9]+$/.test(value) && BigInt(value) < 2n ** 64n);
  if (!ok) {
    throw new TypeError(`timeoutUs must be an integer >= 0 (microseconds), not ${String(value)}`);
  }
  return String(value);
}

/** text_pairs: none, or one second segment per text (a string beside a string). */
function toPairs(texts, pairs) {
  if (pairs === undefined || pairs === null) return [];
  if ((typeof pairs === 'string') !== (typeof texts === 'string')) {
    throw new TypeError('pairs must be a string beside a string text, else an array of strings');
  }
  return toTexts(pairs);
}

/** truncation_direction and truncation_strategy; the counts and halves are the server's check. */
function truncation(opts) {
  const direction = opts.truncation || 'right';
  if (!(direction in DIRECTIONS)) throw new TypeError('truncation must be right or left');
  const strategy = opts.truncationStrategy;
  if (strategy !== undefined && strategy !== null && !(strategy in STRATEGIES)) {
    throw new TypeError(`truncationStrategy must be one of ${Object.keys(STRATEGIES).join(', ')}`);
  }
  return {
    truncation_direction: DIRECTIONS[direction],
    truncation_strategy: strategy ? STRATEGIES[strategy] : 'TRUNCATION_STRATEGY_UNSPECIFIED',
  };
}

function common(texts, opts, model) {
  const request = {
    request_id: opts.requestId || '',
    model: opts.model !== undefined ? opts.model : model,
    version: String(opts.version || 0),
    texts: toTexts(texts),
    text_pairs: toPairs(texts, opts.pairs),
    pooling: pooling(opts.pooling),
    normalize: Boolean(opts.normalize),
    truncate: Boolean(opts.truncate),
    ...truncation(opts),
    raw_values: opts.rawValues !== false, // as the Python client: raw bytes unless told not to
    priority: priority(opts.priority),
    timeout_us: timeoutUs(opts.timeoutUs),
  };
  if (opts.poolingLayer !== undefined && opts.poolingLayer !== null) {
    request.pooling_layer = opts.poolingLayer;
  }
  return request;
}

function embedRequest(texts, opts, model) {
  return common(texts, opts, model);
}

function classifyRequest(texts, opts, model) {
  return {
    ...common(texts, opts, model),
    top_k: opts.topK || 0,
    return_embedding: Boolean(opts.returnEmbedding),
  };
}

/**
 * A Rerank message (TEI's /rerank fields): topN (0: all), rawScores (a pair model's logit),
 * returnText, truncate, truncationStrategy, priority, timeoutUs.
 */
function rerankRequest(query, texts, opts, model) {
  if (typeof query !== 'string') throw new TypeError('query must be a string');
  if (!Array.isArray(texts)) throw new TypeError('texts must be an array of strings');
  const topN = opts.topN === undefined || opts.topN === null ? 0 : opts.topN;
  if (!Number.isInteger(topN) || topN < 0 || topN > 2 ** 31 - 1) {
    throw new TypeError(`topN must be an integer >= 0 (0: all), not ${String(topN)}`);
  }
  return {
    request_id: opts.requestId || '',
    model: opts.model !== undefined ? opts.model : model,
    version: String(opts.version || 0),
    query,
    texts: texts.slice(),
    top_n: topN,
    raw_scores: Boolean(opts.rawScores),
    return_text: Boolean(opts.returnText),
    truncate: Boolean(opts.truncate),
    ...truncation(opts),
    priority: priority(opts.priority),
    timeout_us: timeoutUs(opts.timeoutUs),
  };
}

/** {model, version, method: 'cross_encoder' | 'cosine', results: [{index, score, text?}]}. */
function parseRerank(response) {
  return {
    model: response.model,
    version: Number(response.version),
    method: METHODS[response.method] || 'unknown',
    results: response.results.map((r) => ({
      index: r.index,
      score: r.score,
      ...(r.text ? { text: r.text } : {}),
      usage: r.usage,
    })),
    timings: response.timings,
  };
}

function parseEmbed(response) {
  const embeddings = response.embeddings.map(parseEmbedding);
  return {
    model: response.model,
    version: Number(response.version),
    pooling: response.pooling,
    pooling_layer: response.pooling_layer,
    vectors: embeddings.map((e) => e.vector),
    shapes: embeddings.map((e) => e.shape),
    usage: embeddings.map((e) => e.usage),
    timings: response.timings,
  };
}

function parseClassify(response) {
  return {
    model: response.model,
    version: Number(response.version),
    labels: response.results.map((r) =>
      r.labels.map((s) => ({ label: s.label, index: s.index, probability: s.probability })),
    ),
    embeddings: response.results.map((r) => (r.embedding ? parseEmbedding(r.embedding) : null)),
    usage: response.results.map((r) => r.usage),
    timings: response.timings,
  };
}

/**
 * A stream item: a string (one text), an array of texts, or {texts, pairs, requestId,
 * ...opts} (its own options over the stream's).
 */
function streamItem(item, index) {
  if (typeof item === 'string' || Array.isArray(item)) {
    return { texts: item, opts: { requestId: String(index) } };
  }
  const { texts, ...opts } = item;
  return { texts, opts: { ...opts, requestId: opts.requestId || String(index) } };
}

/** A PEM given as a Buffer, or read from a file path; `what` names it in errors. */
function readPem(value, what) {
  if (value === undefined || value === null || value === '') return null;
  if (Buffer.isBuffer(value)) return value;
  if (typeof value !== 'string') throw new TypeError(`${what} must be a file path or a Buffer`);
  try {
    return fs.readFileSync(value);
  } catch (err) {
    throw new Error(`cannot read ${what} ${value}: ${err.code || err.message}`);
  }
}

/**
 * TLS channel credentials: `tls` is true (the system's roots) or {ca, cert, key}, each a PEM
 * file path or Buffer; ca defaults to the system's roots, cert with key presents a client
 * certificate (mutual TLS, servers started with --tls-client-ca).
 */
function tlsCredentials(tls) {
  const files = tls === true ? {} : tls;
  if (typeof files !== 'object' || files === null) {
    throw new TypeError('tls must be true or {ca, cert, key}');
  }
  const unknown = Object.keys(files).filter((k) => !['ca', 'cert', 'key'].includes(k));
  if (unknown.length > 0) throw new TypeError(`unknown tls option ${unknown.join(', ')}`);
  const hasCert = Boolean(files.cert);
  if (hasCert !== Boolean(files.key)) {
    throw new TypeError('a client certificate needs both tls.cert and tls.key');
  }
  const ca = readPem(files.ca, 'tls.ca');
  const cert = readPem(files.cert, 'tls.cert');
  const key = readPem(files.key, 'tls.key');
  try {
    return grpc.credentials.createSsl(ca, key, cert);
  } catch (err) {
    // OpenSSL's reason (bad PEM, key not matching the certificate); never the key itself.
    throw new Error(`invalid TLS files: ${err.message}`);
  }
}

/** `authorization: Bearer <token>` metadata, or null without a token. */
function tokenMetadata(token) {
  if (token === undefined || token === null || token === '') return null;
  if (typeof token !== 'string' || !TOKEN_PATTERN.test(token)) {
    throw new TypeError('token must be printable ASCII without surrounding spaces');
  }
  const metadata = new grpc.Metadata();
  metadata.set('authorization', `Bearer ${token}`);
  return metadata;
}

class BertClient {
  /**
   * @param {string} address HOST:PORT
   * @param {object} [options] model (default: the server's), timeout and streamTimeout in
   *   seconds (30 and 3600, as the Python client); tls (true: the system's roots, or
   *   {ca, cert, key}: PEM file paths or Buffers, cert+key for mutual TLS); serverName (the
   *   name the server certificate must carry, when it differs from the address's host);
   *   token (a bearer token sent with every call); credentials (ready-made grpc-js channel
   *   credentials instead of tls; default: plaintext)
   */
  constructor(address = 'localhost:8001', options = {}) {
    const Service = loadService();
    this.model = options.model || '';
    this.timeout = options.timeout !== undefined ? options.timeout : 30;
    this.streamTimeout = options.streamTimeout !== undefined ? options.streamTimeout : 3600;
    if (options.tls && options.credentials) {
      throw new TypeError('give either tls or credentials, not both');
    }
    const secure = Boolean(options.tls || options.credentials);
    if (options.serverName && !secure) {
      throw new TypeError('serverName only applies to TLS channels');
    }
    let credentials = options.credentials;
    if (!credentials) {
      credentials = options.tls ? tlsCredentials(options.tls)
        : grpc.credentials.createInsecure();
    }
    // Per-call metadata rather than call credentials: grpc-js composes call credentials with
    // TLS channel credentials only, and a token must also work on a plaintext port (behind a
    // TLS-terminating proxy).
    this.metadata = tokenMetadata(options.token);
    const channelOptions = { ...CHANNEL_OPTIONS };
    if (options.serverName) {
      channelOptions['grpc.ssl_target_name_override'] = options.serverName;
      channelOptions['grpc.default_authority'] = options.serverName;
    }
    this.stub = new Service(address, credentials, channelOptions);
  }

  /** Fresh metadata for one call (grpc-js may add to what it is given). */
  callMetadata() {
    return this.metadata ? this.metadata.clone() : new grpc.Metadata();
  }

  close() {
    this.stub.close();
  }

  deadline(seconds) {
    return new Date(Date.now() + seconds * 1000);
  }

  unary(method, request, timeout) {
    return new Promise((resolve, reject) => {
      const deadline = this.deadline(timeout !== undefined ? timeout : this.timeout);
      this.stub[method](request, this.callMetadata(), { deadline }, (err, response) => {
        if (err) reject(BertstreamError.fromGrpc(err));
        else resolve(response);
      });
    });
  }

  /** Vectors for `texts`: {vectors: Float32Array[], shapes, model, version, ...}. */
  async embed(texts, opts = {}) {
    const response = await this.unary('Embed', embedRequest(texts, opts, this.model), opts.timeout);
    return parseEmbed(response);
  }

  /** Ranked labels for `texts`: {labels: [[{label, index, probability}]], ...}. */
  async classify(texts, opts = {}) {
    const request = classifyRequest(texts, opts, this.model);
    return parseClassify(await this.unary('Classify', request, opts.timeout));
  }

  /**
   * `texts` ordered by relevance to `query`, best first: a pair model's score (method
   * cross_encoder) or the cosine of embeddings (method cosine); see rerankRequest.
   */
  async rerank(query, texts, opts = {}) {
    const request = rerankRequest(query, texts, opts, this.model);
    return parseRerank(await this.unary('Rerank', request, opts.timeout));
  }

  /** EmbedStream: one message per batch; see `stream`. */
  embedStream(batches, opts = {}) {
    return this.stream('EmbedStream', embedRequest, parseEmbed, batches, opts);
  }

  /** ClassifyStream: one message per batch; see `stream`. */
  classifyStream(batches, opts = {}) {
    return this.stream('ClassifyStream', classifyRequest, parseClassify, batches, opts);
  }

  /**
   * Writes every batch as one message with its own request_id, then half-closes; resolves
   * with one {index, requestId, value | error} per batch, in input order, once every
   * request_id is answered. A failed message carries a BertstreamError and the others still
   * resolve; a failure of the whole stream (deadline, server gone) rejects.
   */
  stream(method, build, parse, batches, opts) {
    let requests;
    const indexById = new Map();
    try {
      requests = Array.from(batches, streamItem).map(({ texts, opts: own }) =>
        build(texts, { ...opts, ...own }, this.model));
      requests.forEach((request, index) => {
        if (indexById.has(request.request_id)) {
          throw new TypeError(`duplicate request_id ${JSON.stringify(request.request_id)}`);
        }
        indexById.set(request.request_id, index);
      });
    } catch (err) {
      return Promise.reject(err); // bad arguments reject, as every other failure does
    }
    const timeout = opts.timeout !== undefined ? opts.timeout : this.streamTimeout;
    return new Promise((resolve, reject) => {
      const results = new Array(requests.length);
      let answered = 0;
      let settled = false;
      const finish = (err) => {
        if (settled) return;
        settled = true;
        if (err) {
          call.cancel();
          reject(err);
        } else {
          resolve(results);
        }
      };
      const deadline = this.deadline(timeout);
      const call = this.stub[method](this.callMetadata(), { deadline });
      call.on('data', (response) => {
        const index = indexById.get(response.request_id);
        if (index === undefined || results[index] !== undefined) {
          const what = index === undefined ? 'unknown' : 'repeated';
          finish(new BertstreamError(grpc.status.INTERNAL,
            `${what} request_id ${JSON.stringify(response.request_id)} in the stream`));
          return;
        }
        const result = { index, requestId: response.request_id };
        if (response.error) {
          result.error = new BertstreamError(response.error.code, response.error.message);
        } else {
          try {
            result.value = parse(response);
          } catch (err) {
            finish(BertstreamError.fromGrpc(err));
            return;
          }
        }
        results[index] = result;
        answered += 1;
        if (answered === requests.length) finish(null);
      });
      call.on('error', (err) => finish(BertstreamError.fromGrpc(err)));
      // 'end' follows the last 'data'; 'status' follows 'error'. Only with both seen is an
      // OK stream that left requests unanswered known to be short.
      let ended = false;
      let status = null;
      const checkShort = () => {
        if (ended && status && answered < requests.length) {
          finish(new BertstreamError(status.code === grpc.status.OK ? grpc.status.UNAVAILABLE
            : status.code, `stream ended after ${answered} of ${requests.length} answers`));
        }
      };
      call.on('end', () => { ended = true; checkShort(); });
      call.on('status', (s) => { status = s; checkShort(); });
      for (const request of requests) call.write(request);
      call.end();
      if (requests.length === 0) finish(null);
    });
  }
}

module.exports = {
  BertClient,
  BertstreamError,
  POOLINGS,
  PROTO_FILE,
  STRATEGIES,
  classifyRequest,
  decodeEmbedding,
  embedRequest,
  loadService,
  rerankRequest,
  tlsCredentials,
};
