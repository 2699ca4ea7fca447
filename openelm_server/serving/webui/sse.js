// Reads the Server-Sent Events of a streamed /v1 answer as they arrive and yields each event's
// data (this server ends its lines with \n only). The bytes go through one TextDecoder in
// stream mode: a Chinese character or an emoji split across two network chunks is held back
// until it is whole, never shown as U+FFFD.

export async function* readSse(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder("utf-8");
  let buffer = "";
  const events = function* (final) {
    const parts = buffer.split("\n\n");
    buffer = final ? "" : parts.pop();
    for (const part of parts) {
      const data = part.split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) yield data;
    }
  };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      yield* events(false);
    }
    buffer += decoder.decode();
    yield* events(true);
  } finally {
    reader.releaseLock();
  }
}
