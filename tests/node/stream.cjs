// The npm SDK, unchanged, against a gateway over TLS: a temporary token through
// https://HOST/v3/token, then a streaming session through wss://HOST/v3/ws (the SDK refuses
// anything but wss:). The certificate is trusted through NODE_EXTRA_CA_CERTS.
// Usage: node stream.cjs HOST:PORT  -> prints "RESULT {json}"
const { AssemblyAI } = require("assemblyai");

async function session(client, params) {
  const events = [];
  const rt = client.streaming.transcriber({ websocketBaseUrl: `wss://${process.argv[2]}/v3/ws`, sampleRate: 16000, ...params });
  rt.on("open", () => events.push("Begin"));
  rt.on("turn", () => events.push("Turn"));
  rt.on("error", (e) => events.push(`Error: ${e.message}`));
  rt.on("close", (code) => events.push(`Close ${code}`));
  await rt.connect();
  for (let i = 0; i < 30; i++) {
    rt.sendAudio(new Uint8Array(1600).buffer); // 50 ms of 16 kHz PCM silence
    await new Promise((r) => setTimeout(r, 50));
  }
  await rt.close(); // Terminate, then wait for Termination
  events.push("Closed");
  return events;
}

async function main() {
  const host = process.argv[2];
  const client = new AssemblyAI({ apiKey: "node-key", streamingBaseUrl: `https://${host}` });
  const token = await client.streaming.createTemporaryToken({ expires_in_seconds: 60 });
  const withKey = await session(client, {});
  const withToken = await session(client, { token });
  console.log("RESULT " + JSON.stringify({ token: typeof token, withKey, withToken }));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
