#!/usr/bin/env node
// Runs the @elastic/opamp-client-node OpAMP client (plain HTTP) against a server
// and prints one JSON object per line on stdout for every notable event.
//
//   node node_agent.mjs --endpoint http://127.0.0.1:PORT/v1/opamp \
//       --service-name NAME --instance-id ID \
//       [--heartbeat-seconds N] [--fail-if-contains MARKER] [--header 'Name: value']... [--verbose]
//
// Events (every line also carries "client" and "ts"):
//   started        the client was created and started
//   sent           an AgentToServer went out and got an HTTP answer (or failed, see send_failed)
//   message        a ServerToAgent arrived (notable fields only)
//   send_failed    a send failed (connection error, non-200, wrong Content-Type, error_response)
//   remote_config  remote config was received and its status decided
//   stopping / stopped
//   fatal          the client crashed (exit code 1)
// The client's own log goes to stderr (warn and up; everything with --verbose).

import {subscribe} from 'node:diagnostics_channel';
import {createRequire} from 'node:module';
import os from 'node:os';
import process from 'node:process';
import {parseArgs} from 'node:util';

import opamp from '@elastic/opamp-client-node';

const require = createRequire(import.meta.url);
const CLIENT_VERSION = require('@elastic/opamp-client-node/package.json').version;

const {
    createOpAMPClient,
    AgentCapabilities,
    RemoteConfigStatuses,
    DIAG_CH_SEND_SUCCESS,
    DIAG_CH_SEND_FAIL,
} = opamp;

const STATUS_NAMES = {0: 'UNSET', 1: 'APPLIED', 2: 'APPLYING', 3: 'FAILED'};

function usage(msg) {
    if (msg) process.stderr.write(`node_agent: ${msg}\n`);
    process.stderr.write(
        'usage: node node_agent.mjs --endpoint URL --service-name NAME --instance-id ID ' +
            '[--heartbeat-seconds N] [--fail-if-contains MARKER] [--header "Name: value"]... [--verbose]\n'
    );
    process.exit(2);
}

let args;
try {
    args = parseArgs({
        options: {
            endpoint: {type: 'string'},
            'service-name': {type: 'string'},
            'instance-id': {type: 'string'},
            'heartbeat-seconds': {type: 'string', default: '1'},
            'fail-if-contains': {type: 'string'},
            header: {type: 'string', multiple: true, default: []},
            verbose: {type: 'boolean', default: false},
            help: {type: 'boolean', short: 'h', default: false},
        },
        strict: true,
    }).values;
} catch (err) {
    usage(err.message);
}
if (args.help) usage();
for (const name of ['endpoint', 'service-name', 'instance-id']) {
    if (!args[name]) usage(`--${name} is required`);
}
const heartbeatSeconds = Number(args['heartbeat-seconds']);
if (!Number.isFinite(heartbeatSeconds) || heartbeatSeconds < 0.1) {
    usage('--heartbeat-seconds must be a number >= 0.1 (the client ignores smaller values)');
}
const failMarker = args['fail-if-contains'];
const headers = {};
for (const h of args.header) {
    const i = h.indexOf(':');
    if (i <= 0) usage(`--header must look like 'Name: value', got '${h}'`);
    headers[h.slice(0, i).trim()] = h.slice(i + 1).trim();
}

// ---------------------------------------------------------------------------
// Output helpers
// ---------------------------------------------------------------------------

function hex(bytes) {
    if (!bytes) return null;
    return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('hex');
}

function num(v) {
    // uint64 fields arrive as BigInt; everything printed here fits a double.
    return v === undefined || v === null ? 0 : Number(v);
}

function jsonSafe(_key, value) {
    if (typeof value === 'bigint') return Number(value);
    if (value instanceof Uint8Array) return hex(value);
    if (value instanceof Error) return {name: value.name, message: value.message, code: value.code};
    return value;
}

function emit(event, fields) {
    const line = JSON.stringify({event, client: 'node', ts: Date.now() / 1000, ...fields}, jsonSafe);
    process.stdout.write(line + '\n');
}

function errText(err) {
    if (err instanceof Error) {
        const cause = err.cause instanceof Error ? `: ${err.cause.message}` : '';
        return `${err.name}: ${err.message}${cause}`;
    }
    return String(err);
}

// A pino-style logger for the client (obj?, msg) that writes JSON lines to stderr.
const LEVELS = ['trace', 'debug', 'info', 'warn', 'error', 'fatal'];
const minLevel = args.verbose ? 0 : LEVELS.indexOf('warn');
const log = {};
for (const [i, level] of LEVELS.entries()) {
    log[level] = (first, ...rest) => {
        if (i < minLevel) return;
        let fields = {};
        let msg = '';
        if (first instanceof Error) {
            fields = {err: first};
            msg = rest.join(' ');
        } else if (first && typeof first === 'object') {
            fields = first;
            msg = rest.join(' ');
        } else {
            msg = [first, ...rest].join(' ');
        }
        let line;
        try {
            line = JSON.stringify({log: level, msg, ...fields}, jsonSafe);
        } catch {
            line = JSON.stringify({log: level, msg});
        }
        process.stderr.write(line + '\n');
    };
}

// ---------------------------------------------------------------------------
// Summaries of the protobuf messages (bufbuild objects: unset sub-messages are undefined)
// ---------------------------------------------------------------------------

function summarizeA2S(a2s) {
    const rcs = a2s.remoteConfigStatus;
    return {
        sequence_num: num(a2s.sequenceNum),
        instance_uid: hex(a2s.instanceUid),
        capabilities: num(a2s.capabilities),
        flags: num(a2s.flags),
        has_agent_description: a2s.agentDescription !== undefined,
        has_remote_config_status: rcs !== undefined,
        remote_config_status: rcs
            ? {
                  status: STATUS_NAMES[rcs.status] ?? rcs.status,
                  hash: hex(rcs.lastRemoteConfigHash),
                  error_message: rcs.errorMessage,
              }
            : null,
        has_effective_config: a2s.effectiveConfig !== undefined,
        has_health: a2s.health !== undefined,
        agent_disconnect: a2s.agentDisconnect !== undefined,
    };
}

function summarizeS2A(s2a, ownUid) {
    const rc = s2a.remoteConfig;
    const err = s2a.errorResponse;
    return {
        instance_uid: hex(s2a.instanceUid),
        instance_uid_matches: hex(s2a.instanceUid) === hex(ownUid),
        flags: num(s2a.flags),
        capabilities: num(s2a.capabilities),
        has_remote_config: rc !== undefined,
        remote_config_hash: rc ? hex(rc.configHash) : null,
        remote_config_files: rc ? Object.keys(rc.config?.configMap ?? {}) : [],
        has_error_response: err !== undefined,
        error_type: err ? err.type : null,
        error_message: err ? err.errorMessage : null,
        new_instance_uid: s2a.agentIdentification ? hex(s2a.agentIdentification.newInstanceUid) : null,
        has_command: s2a.command !== undefined,
        command_type: s2a.command ? s2a.command.type : null,
        has_connection_settings: s2a.connectionSettings !== undefined,
        has_packages_available: s2a.packagesAvailable !== undefined,
        has_custom_capabilities: s2a.customCapabilities !== undefined,
        has_custom_message: s2a.customMessage !== undefined,
    };
}

// ---------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------

let client;
let lastReported = null; // "hash/status/error" last handed to setRemoteConfigStatus

function onRemoteConfig(remoteConfig) {
    const files = remoteConfig.config?.configMap ?? {};
    const names = Object.keys(files);
    let status = RemoteConfigStatuses.RemoteConfigStatuses_APPLIED;
    let errorMessage = '';
    if (failMarker !== undefined) {
        const needle = Buffer.from(failMarker, 'utf8');
        for (const name of names) {
            const body = Buffer.from(files[name].body ?? new Uint8Array());
            if (body.includes(needle)) {
                status = RemoteConfigStatuses.RemoteConfigStatuses_FAILED;
                errorMessage = `config file '${name}' contains marker '${failMarker}'`;
                break;
            }
        }
    }
    const hash = remoteConfig.configHash ?? new Uint8Array();
    const key = `${hex(hash)}/${status}/${errorMessage}`;
    const changed = key !== lastReported;
    let reportError = null;
    if (changed) {
        try {
            client.setRemoteConfigStatus({lastRemoteConfigHash: hash, status, errorMessage});
            lastReported = key;
        } catch (err) {
            reportError = errText(err);
        }
    }
    emit('remote_config', {
        hash: hex(hash),
        files: names.map((name) => ({
            name,
            content_type: files[name].contentType,
            size: files[name].body?.length ?? 0,
        })),
        status: STATUS_NAMES[status],
        error_message: errorMessage,
        reported: changed && reportError === null,
        report_error: reportError,
    });
}

const capabilities =
    BigInt(AgentCapabilities.AgentCapabilities_AcceptsRemoteConfig) |
    BigInt(AgentCapabilities.AgentCapabilities_ReportsRemoteConfig);

try {
    client = createOpAMPClient({
        log,
        endpoint: args.endpoint,
        headers,
        capabilities,
        heartbeatIntervalSeconds: heartbeatSeconds,
        diagEnabled: true,
        onMessage: ({remoteConfig}) => {
            if (remoteConfig) onRemoteConfig(remoteConfig);
        },
    });
} catch (err) {
    emit('fatal', {error: errText(err)});
    process.exit(1);
}

// The diagnostics channels are the only place the client exposes the whole
// ServerToAgent (onMessage only gets remote config).
subscribe(DIAG_CH_SEND_SUCCESS, (msg) => {
    emit('sent', summarizeA2S(msg.a2s));
    emit('message', summarizeS2A(msg.s2a, msg.a2s.instanceUid));
});
subscribe(DIAG_CH_SEND_FAIL, (msg) => {
    emit('sent', summarizeA2S(msg.a2s));
    emit('send_failed', {
        sequence_num: num(msg.a2s.sequenceNum),
        error: errText(msg.err),
        retry_after_ms: msg.retryAfterMs ?? null,
    });
});

client.setAgentDescription({
    identifyingAttributes: {
        'service.name': args['service-name'],
        'service.instance.id': args['instance-id'],
    },
    nonIdentifyingAttributes: {
        'host.name': os.hostname(),
        // A JS number: this client sends it as AnyValue.double_value.
        'process.pid': process.pid,
    },
});

process.on('uncaughtException', (err) => {
    emit('fatal', {error: errText(err), stack: err?.stack});
    process.exit(1);
});
process.on('unhandledRejection', (err) => {
    emit('fatal', {error: errText(err), stack: err?.stack});
    process.exit(1);
});

client.start();
emit('started', {
    client_version: CLIENT_VERSION,
    instance_uid: hex(client.getInstanceUid()),
    endpoint: args.endpoint,
    service_name: args['service-name'],
    instance_id: args['instance-id'],
    heartbeat_seconds: heartbeatSeconds,
    capabilities: Number(capabilities | 0x2001n), // ReportsStatus and ReportsHeartbeat are always added
    fail_if_contains: failMarker ?? null,
});

// The client's own timers are unref()'d: keep the process alive until told to stop.
const keepAlive = setInterval(() => {}, 1 << 30);

let stopping = false;
async function stop(signal) {
    if (stopping) return;
    stopping = true;
    emit('stopping', {signal});
    // This client has no AgentDisconnect support: shutdown() only cancels the
    // next send and closes the HTTP connection pool.
    const timer = setTimeout(() => {
        emit('stopped', {disconnect_sent: false, clean: false});
        process.exit(1);
    }, 5000);
    try {
        await client.shutdown();
    } catch (err) {
        log.warn({err}, 'shutdown failed');
    }
    clearTimeout(timer);
    clearInterval(keepAlive);
    emit('stopped', {disconnect_sent: false, clean: true});
    process.exit(0);
}
process.on('SIGTERM', () => stop('SIGTERM'));
process.on('SIGINT', () => stop('SIGINT'));
