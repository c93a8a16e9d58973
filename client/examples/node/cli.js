#!/usr/bin/env node
'use strict';
// node cli.js [--server HOST:PORT] [--model NAME] COMMAND TEXT... : one call, JSON on stdout.
//
// Commands: embed, classify (unary), embed-stream, classify-stream (one bidirectional stream,
// one message per --batch texts). Failures print {"error": {code, grpc_code, message}} on
// stderr and exit 1, as bertstream-client does. A stream prints every message's result or
// error on stdout and exits 1 when any message failed. Bad TLS / token options (a file that
// cannot be read, --tls-cert without --tls-key) print {"error": {code: "USAGE", message}} and
// exit 2. The token is never printed.

const fs = require('fs');
const { parseArgs } = require('util');
const { BertClient, BertstreamError, POOLINGS } = require('./bertstream');

const USAGE = `usage: node cli.js [options] {embed|classify|embed-stream|classify-stream} TEXT...

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

const COMMANDS = new Set(['embed', 'classify', 'embed-stream', 'classify-stream']);

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
  const [command, ...texts] = positionals;
  if (values.help) return { help: true };
  if (!COMMANDS.has(command) || texts.length === 0) {
    throw new TypeError(`expected a command (${[...COMMANDS].join(', ')}) and texts`);
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
  };
  if (values['pooling-layer'] !== undefined) opts.poolingLayer = int('pooling-layer');
  if (values.timeout !== undefined) opts.timeout = Number(values.timeout);
  return { command, texts, opts, server: values.server, model: values.model, batch: int('batch'),
    values };
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

function embedItems(texts, value) {
  return texts.map((text, i) => ({ text, embedding: Array.from(value.vectors[i]) }));
}

function classifyItems(texts, value) {
  return texts.map((text, i) => ({ text, labels: value.labels[i] }));
}

async function run(client, { command, texts, opts, batch }) {
  if (command === 'embed') return embedItems(texts, await client.embed(texts, opts));
  if (command === 'classify') return classifyItems(texts, await client.classify(texts, opts));
  const batches = [];
  for (let i = 0; i < texts.length; i += Math.max(batch, 1)) {
    batches.push(texts.slice(i, i + Math.max(batch, 1)));
  }
  const embed = command === 'embed-stream';
  const results = embed
    ? await client.embedStream(batches, opts)
    : await client.classifyStream(batches, opts);
  return results.map((r) => {
    if (r.error) return { request_id: r.requestId, error: r.error.toJSON() };
    const items = embed ? embedItems(batches[r.index], r.value) : classifyItems(batches[r.index], r.value);
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

module.exports = { main };
