#!/usr/bin/env node
// Example Node.js client of kmsd (kms.v1.KeyManagementService).
//
// Loads protos/kms/v1/kms_service.proto at runtime with @grpc/proto-loader (no
// code generation), then walks through the main operations and prints ONE JSON
// object with the results on stdout. Diagnostics go to stderr. Exits non-zero
// on any unexpected failure.
//
//   node kms_example.js <endpoint> [<ciphertext-base64> [<encryption-context-json>]]
//
//   <endpoint>                 host:port of a kmsd node, e.g. 127.0.0.1:7400
//   <ciphertext-base64>        optional: a ciphertext made elsewhere (for example by the
//                              Python client) to decrypt too; also read from the
//                              environment variable KMS_EXAMPLE_CIPHERTEXT_B64
//   <encryption-context-json>  optional: its encryption context as a JSON object of
//                              strings; also read from KMS_EXAMPLE_CONTEXT_JSON
//
// Mutual TLS (kmsd's default) from the environment, as kmsctl: KMSD_CA (the CA
// bundle), KMSD_CERT and KMSD_KEY (this client's certificate and key; `kmsd dev`
// prints the admin's). KMSD_NO_TLS=1 connects in plaintext (`kmsd dev --plaintext`).
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const crypto = require('node:crypto');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTOS_DIR = path.resolve(__dirname, '..', '..', 'protos');
const DEADLINE_MS = 10000;

// ---------------------------------------------------------------------------
// Loading the service definition at runtime.

function loadKmsPackage() {
  const definition = protoLoader.loadSync('kms/v1/kms_service.proto', {
    includeDirs: [PROTOS_DIR], // google/protobuf/*.proto ship with proto-loader
    keepCase: true, // field names exactly as in the .proto: key_id, ciphertext_blob, ...
    longs: String, // uint64 commit_index as a decimal string
    enums: String, // enums by name: 'KEY_STATE_ENABLED'
    bytes: Buffer,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).kms.v1;
}

// ---------------------------------------------------------------------------
// Decoding kmsd's rich errors: the `grpc-status-details-bin` trailer holds a
// serialized google.rpc.Status whose details are google.protobuf.Any messages,
// one of which is a google.rpc.ErrorInfo with metadata["aws_exception"].

const RPC_PROTO = `
syntax = "proto3";
package google.rpc;
message Status {
  int32 code = 1;
  string message = 2;
  repeated Any details = 3;
}
// Same wire format as google.protobuf.Any.
message Any {
  string type_url = 1;
  bytes value = 2;
}
message ErrorInfo {
  string reason = 1;
  string domain = 2;
  map<string, string> metadata = 3;
}
message BadRequest {
  message FieldViolation {
    string field = 1;
    string description = 2;
  }
  repeated FieldViolation field_violations = 1;
}
`;
const rpcRoot = protobuf.parse(RPC_PROTO, { keepCase: true }).root;
const RpcStatus = rpcRoot.lookupType('google.rpc.Status');
const ErrorInfo = rpcRoot.lookupType('google.rpc.ErrorInfo');
const BadRequest = rpcRoot.lookupType('google.rpc.BadRequest');

const CODE_NAMES = Object.fromEntries(
  Object.entries(grpc.status).map(([name, value]) => [value, name]),
);

/** The code, message, ErrorInfo and field violations of a failed call. */
function describeGrpcError(error) {
  const result = {
    code: error.code,
    code_name: CODE_NAMES[error.code] || String(error.code),
    message: error.details,
    reason: null,
    domain: null,
    aws_exception: null,
    field_violations: [],
  };
  const raw = error.metadata ? error.metadata.get('grpc-status-details-bin') : [];
  if (raw.length === 0) {
    return result;
  }
  const status = RpcStatus.decode(raw[0]);
  for (const detail of status.details) {
    const typeName = detail.type_url.slice(detail.type_url.lastIndexOf('/') + 1);
    if (typeName === 'google.rpc.ErrorInfo') {
      const info = ErrorInfo.decode(detail.value);
      result.reason = info.reason;
      result.domain = info.domain;
      result.aws_exception = (info.metadata || {}).aws_exception || null;
    } else if (typeName === 'google.rpc.BadRequest') {
      const bad = BadRequest.decode(detail.value);
      result.field_violations = bad.field_violations.map((v) => ({
        field: v.field,
        description: v.description,
      }));
    }
  }
  return result;
}

// ---------------------------------------------------------------------------
// Calls as promises, each with a deadline.

function call(client, method, request) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + DEADLINE_MS);
    client[method](request, { deadline }, (error, response) => {
      if (error) {
        error.rpcMethod = method;
        reject(error);
      } else {
        resolve(response);
      }
    });
  });
}

function b64(buffer) {
  return Buffer.from(buffer).toString('base64');
}

function check(condition, message) {
  if (!condition) {
    throw new Error(`check failed: ${message}`);
  }
}

// Mutual TLS from KMSD_CA/KMSD_CERT/KMSD_KEY; plaintext only with KMSD_NO_TLS=1.
function channelCredentials(env) {
  if (env.KMSD_NO_TLS === '1') {
    return grpc.credentials.createInsecure();
  }
  if (!env.KMSD_CA) {
    throw new Error('set KMSD_CA, KMSD_CERT and KMSD_KEY (or KMSD_NO_TLS=1 for plaintext)');
  }
  const read = (name) => (env[name] ? fs.readFileSync(env[name]) : null);
  return grpc.credentials.createSsl(read('KMSD_CA'), read('KMSD_KEY'), read('KMSD_CERT'));
}

// ---------------------------------------------------------------------------

async function main(argv) {
  const endpoint = argv[2];
  if (!endpoint) {
    process.stderr.write(
      'usage: node kms_example.js <endpoint> [<ciphertext-base64> [<context-json>]]\n',
    );
    return 2;
  }
  const externalB64 = argv[3] || process.env.KMS_EXAMPLE_CIPHERTEXT_B64 || '';
  const externalContext = JSON.parse(argv[4] || process.env.KMS_EXAMPLE_CONTEXT_JSON || '{}');

  const kms = loadKmsPackage();
  const client = new kms.KeyManagementService(endpoint, channelCredentials(process.env));
  const out = { endpoint };
  try {
    // CreateKey with a description and a tag; request_id makes retries idempotent.
    const created = await call(client, 'CreateKey', {
      description: 'created by clients/node/kms_example.js',
      tags: [{ tag_key: 'created-by', tag_value: 'node-example' }],
      request_id: crypto.randomUUID(),
    });
    const key = created.key_metadata;
    out.create_key = {
      key_id: key.key_id,
      arn: key.arn,
      description: key.description,
      key_state: key.key_state,
      key_spec: key.key_spec,
      commit_index: created.commit_index,
    };

    const tags = await call(client, 'ListResourceTags', { key_id: key.key_id });
    out.tags = tags.tags.map((t) => ({ tag_key: t.tag_key, tag_value: t.tag_value }));

    // DescribeKey, reading our own write (min_commit_index matters on a cluster).
    const described = await call(client, 'DescribeKey', {
      key_id: key.arn,
      min_commit_index: created.commit_index,
    });
    out.describe_key = {
      key_id: described.key_metadata.key_id,
      arn: described.key_metadata.arn,
      description: described.key_metadata.description,
      key_state: described.key_metadata.key_state,
      enabled: described.key_metadata.enabled,
    };
    check(described.key_metadata.key_id === key.key_id, 'DescribeKey names the created key');

    // Encrypt with an encryption context, then Decrypt with the same context.
    const plaintext = Buffer.from('hello from node: ' + crypto.randomBytes(8).toString('hex'));
    const context = { purpose: 'node-example', tenant: 'ümlaut-✓' };
    const encrypted = await call(client, 'Encrypt', {
      key_id: key.key_id,
      plaintext,
      encryption_context: context,
    });
    out.encrypt = {
      plaintext_b64: b64(plaintext),
      ciphertext_b64: b64(encrypted.ciphertext_blob),
      key_id: encrypted.key_id,
      encryption_algorithm: encrypted.encryption_algorithm,
      encryption_context: context,
    };
    const decrypted = await call(client, 'Decrypt', {
      ciphertext_blob: encrypted.ciphertext_blob,
      encryption_context: context,
      key_id: key.key_id, // optional, and recommended
    });
    out.decrypt = {
      plaintext_b64: b64(decrypted.plaintext),
      key_id: decrypted.key_id,
      key_material_id: decrypted.key_material_id,
    };
    check(decrypted.plaintext.equals(plaintext), 'Decrypt returns the encrypted plaintext');

    // GenerateDataKey (AES_256) and Decrypt of the data key's ciphertext.
    const dataKey = await call(client, 'GenerateDataKey', {
      key_id: key.arn,
      key_spec: 'DATA_KEY_SPEC_AES_256',
      encryption_context: context,
    });
    const dataKeyBack = await call(client, 'Decrypt', {
      ciphertext_blob: dataKey.ciphertext_blob,
      encryption_context: context,
    });
    out.data_key = {
      plaintext_b64: b64(dataKey.plaintext),
      ciphertext_b64: b64(dataKey.ciphertext_blob),
      length: dataKey.plaintext.length,
      key_id: dataKey.key_id,
      decrypted_b64: b64(dataKeyBack.plaintext),
    };
    check(dataKeyBack.plaintext.equals(dataKey.plaintext), 'the data key decrypts');

    // CreateAlias, then Encrypt through the alias.
    const aliasName = `alias/node-example-${crypto.randomBytes(6).toString('hex')}`;
    await call(client, 'CreateAlias', { alias_name: aliasName, target_key_id: key.key_id });
    const viaAlias = await call(client, 'Encrypt', {
      key_id: aliasName,
      plaintext: Buffer.from('via alias'),
    });
    const viaAliasBack = await call(client, 'Decrypt', { ciphertext_blob: viaAlias.ciphertext_blob });
    out.alias = {
      alias_name: aliasName,
      encrypt_key_id: viaAlias.key_id,
      ciphertext_b64: b64(viaAlias.ciphertext_blob),
      decrypted_b64: b64(viaAliasBack.plaintext),
    };
    check(viaAlias.key_id === key.arn, 'Encrypt via the alias uses the aliased key');

    // A call that must fail: Decrypt with the wrong encryption context.
    try {
      await call(client, 'Decrypt', {
        ciphertext_blob: encrypted.ciphertext_blob,
        encryption_context: { ...context, purpose: 'wrong' },
      });
      throw new Error('Decrypt with a wrong encryption context succeeded');
    } catch (error) {
      if (error.code === undefined) {
        throw error;
      }
      out.expected_error = { rpc: 'Decrypt', ...describeGrpcError(error) };
    }

    // Optional: decrypt a ciphertext made by another client (interop check).
    if (externalB64) {
      const external = await call(client, 'Decrypt', {
        ciphertext_blob: Buffer.from(externalB64, 'base64'),
        encryption_context: externalContext,
      });
      out.external_decrypt = {
        plaintext_b64: b64(external.plaintext),
        key_id: external.key_id,
      };
    }
  } catch (error) {
    const failure = { message: String(error && error.message) };
    if (error && error.code !== undefined) {
      Object.assign(failure, { rpc: error.rpcMethod }, describeGrpcError(error));
    }
    out.failure = failure;
    process.stdout.write(JSON.stringify(out) + '\n');
    process.stderr.write(`kms_example.js: unexpected failure: ${JSON.stringify(failure)}\n`);
    return 1;
  } finally {
    client.close();
  }
  process.stdout.write(JSON.stringify(out) + '\n');
  return 0;
}

main(process.argv).then(
  (code) => {
    process.exitCode = code;
  },
  (error) => {
    process.stderr.write(`kms_example.js: ${error && error.stack}\n`);
    process.exitCode = 1;
  },
);
