// The playground: chat (or raw completion) streamed from this server's OpenAI API, with each
// answer's numbers and the server's live state. Text from people or the model only ever
// reaches the page as textContent or through renderMarkdown, which escapes it first.

import { renderMarkdown } from "./markdown.js";
import { readSse } from "./sse.js";

const KEY_STORAGE = "openelm-api-key";
const STATE_POLL_MS = 1000;
// The sampling settings, by input id; each one is sent only when the field is filled in, so
// an empty field means the server's default.
const NUMBER_SETTINGS = ["temperature", "top_p", "top_k", "max_tokens", "repetition_penalty", "seed"];

const $ = (id) => document.getElementById(id);
const messages = $("messages");
const prompt = $("prompt");
const sendButton = $("send");
const stopButton = $("stop-button");
const apiKey = $("api-key");

let conversation = []; // {role, content} of the chat so far, without the system prompt
let running = null; // the AbortController of the answer being streamed

// ---- API key --------------------------------------------------------------------------------

apiKey.value = localStorage.getItem(KEY_STORAGE) || "";
$("api-key-row").hidden = !apiKey.value;
apiKey.addEventListener("input", () => {
  if (apiKey.value) localStorage.setItem(KEY_STORAGE, apiKey.value);
  else localStorage.removeItem(KEY_STORAGE);
});

function headers() {
  const result = { "Content-Type": "application/json" };
  if (apiKey.value) result.Authorization = `Bearer ${apiKey.value}`;
  return result;
}

// Shown once the server asks for a key (settings unfolded that once, so that a phone user can
// fold them away again while the state polls go on being refused).
function askForKey() {
  if (!$("api-key-row").hidden) return;
  $("api-key-row").hidden = false;
  $("settings").open = true;
}

// ---- the server's state ---------------------------------------------------------------------

async function showState() {
  try {
    const response = await fetch("/stats", { headers: headers() });
    if (response.status === 401) {
      $("server-state").textContent = "API key missing or wrong (Settings)";
      askForKey();
    } else if (response.ok) {
      const s = await response.json();
      $("model").textContent = s.model;
      $("server-state").textContent = `running ${s.requests_running} · waiting ${s.requests_waiting} · `
        + `KV cache ${s.kv_cache_blocks_used}/${s.kv_cache_blocks_total} blocks (${Math.round(s.kv_cache_usage * 100)}%)`;
    } else {
      $("server-state").textContent = `state unavailable (HTTP ${response.status})`;
    }
  } catch {
    $("server-state").textContent = "server unreachable";
  }
}

async function pollState() {
  await showState();
  setTimeout(pollState, STATE_POLL_MS);
}

// ---- settings -------------------------------------------------------------------------------

class SettingsError extends Error {}

function samplingFields() {
  const fields = {};
  for (const id of NUMBER_SETTINGS) {
    const input = $(id);
    if (input.validity.badInput) throw new SettingsError(`${id} is not a number`);
    if (input.value === "") continue;
    const value = Number(input.value);
    if (id === "seed" && !Number.isSafeInteger(value)) {
      throw new SettingsError("seed must be a whole number below 2^53 in this page");
    }
    fields[id] = value;
  }
  const stop = $("stop").value.split("\n").filter((line) => line !== "").map((line) => line.replaceAll("\\n", "\n"));
  if (stop.length) fields.stop = stop;
  return fields;
}

// ---- messages -------------------------------------------------------------------------------

function nearBottom() {
  return messages.scrollHeight - messages.scrollTop - messages.clientHeight < 80;
}

function addMessage(role) {
  const node = document.createElement("div");
  node.className = `message ${role}`;
  messages.append(node);
  return node;
}

function addUserMessage(text) {
  const node = addMessage("user");
  node.textContent = text;
  return node;
}

// The assistant's bubble: the answer, then its numbers.
function addAnswer() {
  const node = addMessage("assistant");
  const body = document.createElement("div");
  body.className = "answer";
  body.dataset.testid = "answer";
  const stats = document.createElement("div");
  stats.className = "stats";
  stats.dataset.testid = "stats";
  node.append(body, stats);
  return { body, stats };
}

// Tokens, time to first token and tokens/s (decode speed, after the first token). While the
// answer streams, and when it is stopped, the count is of streamed pieces: one per token,
// except the byte tokens of a character still being completed.
function statsText({ tokens, exact, start, first, end, stopped }) {
  const count = `${exact ? "" : "~"}${tokens} tok`;
  const ttft = first ? `TTFT ${((first - start) / 1000).toFixed(2)} s` : "TTFT –";
  const rate = first && tokens > 1 && end > first ? ((tokens - 1) / ((end - first) / 1000)).toFixed(1) : "–";
  return [count, ttft, `${rate} tok/s`].concat(stopped ? ["stopped"] : []).join(" · ");
}

function showError(answer, text) {
  answer.body.classList.add("error");
  answer.body.textContent = text;
}

async function errorText(response) {
  let message = `HTTP ${response.status}`;
  try {
    const body = await response.json();
    message += `: ${body.error?.message ?? body.error ?? JSON.stringify(body)}`;
  } catch {
    // not JSON: the status says enough
  }
  return message;
}

// ---- sending --------------------------------------------------------------------------------

function requestFor(text, mode) {
  const fields = { ...samplingFields(), stream: true, stream_options: { include_usage: true } };
  if (mode === "completion") return { path: "/v1/completions", body: { ...fields, prompt: text } };
  const system = $("system").value.trim();
  const history = system ? [{ role: "system", content: system }, ...conversation] : conversation;
  return { path: "/v1/chat/completions", body: { ...fields, messages: [...history, { role: "user", content: text }] } };
}

async function send() {
  const text = prompt.value;
  if (running || !text.trim()) return;
  const mode = $("mode").value;
  const thread = conversation; // "New conversation" during the answer starts a new array
  let request;
  try {
    request = requestFor(text, mode);
  } catch (error) {
    if (!(error instanceof SettingsError)) throw error;
    showError(addAnswer(), `Settings: ${error.message}`);
    return;
  }
  prompt.value = "";
  if (mode === "chat") addUserMessage(text);
  const answer = addAnswer();
  let continuation = null;
  if (mode === "completion") {
    // Raw completion shows the prompt and its continuation together, as the tutorial's POST / answers.
    const echo = document.createElement("span");
    echo.className = "echo";
    echo.textContent = text;
    continuation = document.createElement("span");
    answer.body.classList.add("raw");
    answer.body.append(echo, continuation);
  }

  running = new AbortController();
  sendButton.disabled = true;
  stopButton.disabled = false;
  const timing = { tokens: 0, exact: false, start: performance.now(), first: 0, end: 0, stopped: false };
  let output = "";
  let failed = false;
  const show = () => {
    const follow = nearBottom();
    if (continuation) continuation.textContent = output;
    else answer.body.innerHTML = renderMarkdown(output);
    answer.stats.textContent = statsText(timing);
    if (follow) messages.scrollTop = messages.scrollHeight;
  };
  show();
  try {
    const response = await fetch(request.path, {
      method: "POST", headers: headers(), body: JSON.stringify(request.body), signal: running.signal,
    });
    if (!response.ok) {
      failed = true;
      if (response.status === 401) {
        askForKey();
        $("settings").open = true;
        apiKey.focus();
      }
      showError(answer, await errorText(response));
    } else {
      for await (const data of readSse(response.body)) {
        if (data === "[DONE]") break;
        const event = JSON.parse(data);
        if (event.error) {
          failed = true;
          showError(answer, `Error: ${event.error.message}`);
          break;
        }
        if (event.usage) {
          timing.tokens = event.usage.completion_tokens;
          timing.exact = true;
        }
        const choice = event.choices?.[0];
        const piece = choice ? (mode === "chat" ? choice.delta.content : choice.text) : "";
        if (piece) {
          timing.first ||= performance.now();
          timing.tokens += 1;
          output += piece;
        }
        timing.end = performance.now();
        show();
      }
    }
  } catch (error) {
    if (error.name === "AbortError") {
      timing.stopped = true;
      timing.end = performance.now();
      show();
    } else {
      failed = true;
      showError(answer, `Could not reach the server: ${error.message}`);
    }
  } finally {
    running = null;
    sendButton.disabled = false;
    stopButton.disabled = true;
  }
  showState(); // the state after this answer, without waiting for the next poll
  if (failed) {
    // The message goes back into the box, to send again once fixed; the conversation goes on
    // without it.
    if (!prompt.value) prompt.value = text;
  } else if (mode === "chat") {
    thread.push({ role: "user", content: text }, { role: "assistant", content: output });
  }
}

// ---- wiring ---------------------------------------------------------------------------------

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
prompt.addEventListener("keydown", (event) => {
  // Enter sends, Shift+Enter adds a line; Enter that confirms an input method's candidate
  // (Chinese, Japanese) does neither.
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
    event.preventDefault();
    send();
  }
});
stopButton.addEventListener("click", () => running?.abort());
$("clear").addEventListener("click", () => {
  running?.abort();
  conversation = [];
  messages.replaceChildren();
});
$("mode").addEventListener("change", () => {
  $("system").disabled = $("mode").value !== "chat";
});
$("settings").open = window.matchMedia("(min-width: 800px)").matches;
pollState();
