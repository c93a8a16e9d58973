#!/usr/bin/env node
'use strict';
// node cli.js [--server HOST:PORT] [--model NAME] COMMAND TEXT... : one call, JSON on stdout.
//
// Commands: embed, classify, rerank (unary), embed-stream, classify-stream (one bidirectional
// stream, one message per --batch texts). With --pair each text is a pair, split at its first
// TAB or else at its last ' ||| ' (bert-as-service's `a ||| b`); `-` as the texts reads stdin's
// lines.
// `rerank --query Q TEXT...` prints {model, version, method, results}. Failures print {"error": {code, grpc_code, message}} on
// stderr and exit 1, as bertstream-client does. A stream prints every message's result or
// error on stdout and exits 1 when any message failed. Bad TLS / token options (a file that
// cannot be read, --tls-cert without --tls-key) print {"error": {code: "USAGE", message}} and
// exit 2. The token is never printed.

const fs = require('fs');
const { parseArgs } = require('util');
const { BertClient, BertstreamError, POOLINGS, STRATEGIES } = require('./bertstream');

const USAGE = `usage: node cli.js [options] {embed|classify|rerank|embed-stream|classify-stream} TEXT...

TEXT... may be - : the lines of stdin, blank ones skipped.

options (before or after the command):
  --server HOST:PORT     default localhost:8001
  --model NAME           default: the server's default model
  --version N            0: the version policy's default
  --timeout S            deadline in seconds (default 30; streams 3600)
  --pooling P            ${Object.keys(POOLINGS).join('|')}
  --pooling-layer=N      1..num_layers, or -1 for the last (write negatives with =)
  --normalize            L2-normalise vectors
  --truncate             cut texts over the model's limit instead of refusing them
  --top-k K              labels per text (classify; 0: all)
  --pair                 each text is a pair, its halves split at the first TAB, or else
                         at the last ' ||| ' ('a ||| b'); a pair model's classify needs them
  --truncation-strategy S  longest_first|only_first|only_second: the half --truncate cuts
                         (default longest_first; rerank: only_second)
  --query Q              rerank: what the texts are ranked against (required)
  --top-n N              rerank: keep the best N (0, default: all)
  --raw-scores           rerank with a pair model: logits, not probabilities
  --priority N           queue level, 1 the highest; 0 (default): the server decides
                         (level 1 for a call of up to 16 texts, the model's lowest
                         level for stream messages and larger calls)
  --timeout-us N         longest wait in the server's queue before DEADLINE_EXCEEDED,
                         in microseconds (0, default: the level's queue policy)
  --batch N              texts per stream message (default 1)
  --no-raw               ask for repeated floats instead of raw float32 bytes
  --tls                  TLS, trusting the system's CAs (implied by the --tls-* files)
  --tls-ca FILE          CA certificate(s) to trust (PEM) instead of the system's
  --tls-cert FILE        client certificate (PEM), for mutual TLS (with --tls-key)
  --tls-key FILE         client private key (PEM), for mutual TLS
  --tls-server-name NAME the name the server certificate must carry, when not the host's
  --token TOKEN          bearer token (default: $BERTSTREAM_TOKEN)
  -h, --help`;

// grpc-js sets the TLS server name (SNI) to the address's host even when it is an IP
// address, and Node then warns once (DEP0123) on stderr, where this command prints JSON. The
// certificate is still checked against that IP; only this one warning is dropped.
const emitWarning = process.emitWarning;
process.emitWarning = function filtered(warning, ...args) {
  const code = typeof args[0] === 'object' && args[0] !== null ? args[0].code : args[1];
  if (code === 'DEP0123') return;
  emitWarning.call(process, warning, ...args);
};

const COMMANDS = new Set(['embed', 'classify', 'rerank', 'embed-stream', 'classify-stream']);

const PAIR_SEPARATOR = ' ||| '; // bert-as-service's

/** The halves of a --pair text: at the first TAB, or else at the last ' ||| ' (as the server's
 * bert-as-service /encode splits `a ||| b`). */
function splitPair(text) {
  const tab = text.indexOf('\t');
  if (tab >= 0) return [text.slice(0, tab), text.slice(tab + 1)];
  const bar = text.lastIndexOf(PAIR_SEPARATOR);
  if (bar >= 0) return [text.slice(0, bar), text.slice(bar + PAIR_SEPARATOR.length)];
  throw new TypeError(`--pair: ${JSON.stringify(text)} has no TAB or ' ||| ' between its halves`);
}

function readStdinLines() {
  return fs.readFileSync(0, 'utf8').split(/\r?\n/).filter((line) => line.trim() !== '');
}

function parse(argv) {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      server: { type: 'string', default: 'localhost:8001' },
      model: { type: 'string', default: '' },
      version: { type: 'string', default: '0' },
      timeout: { type: 'string' },
      pooling: { type: 'string' },
      'pooling-layer': { type: 'string' },
      normalize: { type: 'boolean', default: false },
      truncate: { type: 'boolean', default: false },
      'top-k': { type: 'string', default: '0' },
      pair: { type: 'boolean', default: false },
      'truncation-strategy': { type: 'string' },
      query: { type: 'string' },
      'top-n': { type: 'string', default: '0' },
      'raw-scores': { type: 'boolean', default: false },
      priority: { type: 'string', default: '0' },
      'timeout-us': { type: 'string', default: '0' },
      batch: { type: 'string', default: '1' },
      'no-raw': { type: 'boolean', default: false },
      tls: { type: 'boolean', default: false },
      'tls-ca': { type: 'string' },
      'tls-cert': { type: 'string' },
      'tls-key': { type: 'string' },
      'tls-server-name': { type: 'string' },
      token: { type: 'string' },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  const [command, ...given] = positionals;
  if (values.help) return { help: true };
  const texts = given.length === 1 && given[0] === '-' ? readStdinLines() : given;
  if (!COMMANDS.has(command) || texts.length === 0) {
    throw new TypeError(`expected a command (${[...COMMANDS].join(', ')}) and texts`);
  }
  if (command === 'rerank' && values.query === undefined) {
    throw new TypeError('rerank needs --query');
  }
  if (values.pair && command === 'rerank') {
    throw new TypeError('--pair: rerank pairs --query with each text itself');
  }
  const strategy = values['truncation-strategy'];
  if (strategy !== undefined && !(strategy in STRATEGIES)) {
    throw new TypeError(`--truncation-strategy must be one of ${Object.keys(STRATEGIES).join(', ')}`);
  }
  const int = (name) => {
    const n = Number(values[name]);
    if (!Number.isInteger(n)) throw new TypeError(`--${name} must be an integer`);
    return n;
  };
  const whole = (name, top) => { // priority: a uint32; timeout_us: a uint64, kept a string
    const text = values[name];
    if (!/^[0-9]+$/.test(text) || BigInt(text) > top) {
      throw new TypeError(`--${name} must be an integer from 0 to ${top}`);
    }
    return name === 'priority' ? Number(text) : text;
  };
  const opts = {
    version: int('version'),
    pooling: values.pooling,
    normalize: values.normalize,
    truncate: values.truncate,
    topK: int('top-k'),
    rawValues: !values['no-raw'],
    priority: whole('priority', 2n ** 32n - 1n),
    timeoutUs: whole('timeout-us', 2n ** 64n - 1n),
    truncationStrategy: strategy,
    topN: Number(whole('top-n', 2n ** 31n - 1n)),
    rawScores: values['raw-scores'],
  };
  if (values['pooling-layer'] !== undefined) opts.poolingLayer = int('pooling-layer');
  if (values.timeout !== undefined) opts.timeout = Number(values.timeout);
  const halves = values.pair ? texts.map(splitPair) : null;
  return { command, texts: halves ? halves.map((h) => h[0]) : texts,
    pairs: halves ? halves.map((h) => h[1]) : null, query: values.query, opts,
    server: values.server, model: values.model, batch: int('batch'), values };
}

/** An option error that exits 2 with a JSON message (as bertstream-client's usage errors). */
class UsageError extends Error {}

function readFlagFile(flag, file) {
  if (file === undefined) return undefined;
  if (file === '') throw new UsageError(`${flag} needs a file`);
  try {
    return fs.readFileSync(file);
  } catch (err) {
    throw new UsageError(`${flag}: cannot read ${file}: ${err.code || err.message}`);
  }
}

/** BertClient options from the TLS / token flags; the files are read here. */
function clientOptions(model, values) {
  const options = { model };
  const [ca, cert, key] = ['tls-ca', 'tls-cert', 'tls-key'].map((name) => values[name]);
  if ((cert === undefined) !== (key === undefined)) {
    throw new UsageError('--tls-cert and --tls-key go together');
  }
  if (values.tls || ca !== undefined || cert !== undefined) {
    options.tls = {
      ca: readFlagFile('--tls-ca', ca),
      cert: readFlagFile('--tls-cert', cert),
      key: readFlagFile('--tls-key', key),
    };
  }
  const serverName = values['tls-server-name'];
  if (serverName !== undefined) {
    if (!options.tls) throw new UsageError('--tls-server-name needs --tls or a --tls-* file');
    options.serverName = serverName;
  }
  const token = values.token !== undefined ? values.token : process.env.BERTSTREAM_TOKEN;
  if (token) options.token = token;
  return options;
}

function usageError(err) {
  process.stderr.write(`${JSON.stringify({ error: { code: 'USAGE', message: err.message } })}\n`);
  return 2;
}

/** {text} or, for a pair, {text, text_pair}, with the answer's fields. */
function item(text, pairs, i, fields) {
  return pairs ? { text, text_pair: pairs[i], ...fields } : { text, ...fields };
}

function embedItems(texts, pairs, value) {
  return texts.map((text, i) => item(text, pairs, i, { embedding: Array.from(value.vectors[i]) }));
}

function classifyItems(texts, pairs, value) {
  return texts.map((text, i) => item(text, pairs, i, { labels: value.labels[i] }));
}

async function rerank(client, query, texts, opts) {
  const { model, version, method, results } = await client.rerank(query, texts, opts);
  return { model, version, method,
    results: results.map((r) => ({ index: r.index, score: r.score, text: texts[r.index] })) };
}

async function run(client, { command, texts, pairs, query, opts, batch }) {
  const unary = { ...opts, ...(pairs ? { pairs } : {}) };
  if (command === 'embed') return embedItems(texts, pairs, await client.embed(texts, unary));
  if (command === 'classify') {
    return classifyItems(texts, pairs, await client.classify(texts, unary));
  }
  if (command === 'rerank') return rerank(client, query, texts, opts);
  const batches = [];
  const size = Math.max(batch, 1);
  for (let i = 0; i < texts.length; i += size) {
    const batchTexts = texts.slice(i, i + size);
    batches.push(pairs ? { texts: batchTexts, pairs: pairs.slice(i, i + size) } : batchTexts);
  }
  const embed = command === 'embed-stream';
  const results = embed
    ? await client.embedStream(batches, opts)
    : await client.classifyStream(batches, opts);
  return results.map((r) => {
    if (r.error) return { request_id: r.requestId, error: r.error.toJSON() };
    const b = batches[r.index];
    const [bTexts, bPairs] = Array.isArray(b) ? [b, null] : [b.texts, b.pairs];
    const items = embed ? embedItems(bTexts, bPairs, r.value)
      : classifyItems(bTexts, bPairs, r.value);
    return { request_id: r.requestId, version: r.value.version, items };
  });
}

async function main(argv) {
  let args;
  try {
    args = parse(argv);
  } catch (err) {
    process.stderr.write(`${err.message}\n${USAGE}\n`);
    return 2;
  }
  if (args.help) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  let client;
  try {
    client = new BertClient(args.server, clientOptions(args.model, args.values));
  } catch (err) {
    // Unreadable or invalid PEM files, a malformed token: no stack trace, never the token.
    return usageError(err);
  }
  try {
    const result = await run(client, args);
    process.stdout.write(`${JSON.stringify(result)}\n`);
    // A stream goes on past a failed message; the exit status still tells scripts about it.
    const failed = args.command.endsWith('-stream') && result.some((r) => r.error);
    return failed ? 1 : 0;
  } catch (err) {
    const error = BertstreamError.fromGrpc(err);
    process.stderr.write(`${JSON.stringify({ error: error.toJSON() })}\n`);
    return 1;
  } finally {
    client.close();
  }
}

if (require.main === module) {
  main(process.argv.slice(2)).then((code) => {
    process.exitCode = code;
  });
}

module.exports = { main, splitPair };
