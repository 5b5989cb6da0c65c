// The chat page: keeps the conversation, streams each reply from /v1/chat/completions
// (server-sent events read through fetch), and shows reasoning, tool calls and errors apart.
"use strict";

const KEY_STORAGE = "pygemma4.apiKey";

const conversation = document.getElementById("conversation");
const composer = document.getElementById("composer");
const promptBox = document.getElementById("prompt");
const sendButton = document.getElementById("send");
const stopButton = document.getElementById("stop");
const clearButton = document.getElementById("clear");
const keyInput = document.getElementById("api-key");
const systemInput = document.getElementById("system-prompt");
const temperatureInput = document.getElementById("temperature");
const maxTokensInput = document.getElementById("max-tokens");
const thinkingInput = document.getElementById("thinking");
const toolsInput = document.getElementById("tools");
const toolChoiceInput = document.getElementById("tool-choice");
const settings = document.getElementById("settings");
const modelName = document.getElementById("model-name");

let history = [];
let model = null;
let running = null;

function headers() {
  const result = { "Content-Type": "application/json" };
  const key = keyInput.value.trim();
  if (key) result.Authorization = "Bearer " + key;
  return result;
}

// An OpenAI-shaped error body ({"error": {"message", "type", "code"}}) as one line of text.
function errorText(body, status) {
  const error = body && body.error;
  if (error && typeof error === "object") {
    const kind = [error.type, error.code].filter(Boolean).join(", ");
    return (status ? "HTTP " + status + ": " : "") + (error.message || "error") + (kind ? " (" + kind + ")" : "");
  }
  return "HTTP " + status + ": " + (typeof body === "string" ? body : JSON.stringify(body));
}

// The error a failed response answered, with its HTTP status.
async function failure(response) {
  const text = await response.text();
  let message;
  try {
    message = errorText(JSON.parse(text), response.status);
  } catch {
    message = errorText(text, response.status);
  }
  return Object.assign(new Error(message), { status: response.status });
}

// The served model's name (the one /v1/models lists), shown in the header; throws what failed.
async function loadModel() {
  model = null;
  modelName.textContent = "(connecting)";
  try {
    const response = await fetch("v1/models", { headers: headers() });
    if (!response.ok) throw await failure(response);
    model = (await response.json()).data[0].id;
    modelName.textContent = model;
    return model;
  } catch (error) {
    modelName.textContent = "unavailable: " + error.message;
    throw error;
  }
}

// Shows the model's name; where the server wants a key, opens the settings at its field.
function showModel() {
  loadModel().catch((error) => {
    if (error.status === 401) {
      settings.open = true;
      keyInput.focus();
    }
  });
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function addMessage(role) {
  const item = element("li", "message " + role);
  item.append(element("p", "role", role === "user" ? "You" : "Assistant"));
  conversation.append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

function showError(item, text) {
  const box = element("p", "error", text);
  box.setAttribute("role", "alert");
  item.append(box);
}

// The view of one assistant reply, filled in as its deltas arrive.
class Reply {
  constructor(item) {
    this.item = item;
    this.content = "";
    this.reasoning = "";
    this.calls = [];
    this.reasoningBox = element("details", "reasoning");
    this.reasoningBox.append(element("summary", "", "Reasoning"));
    this.reasoningText = element("div", "text");
    this.reasoningBox.append(this.reasoningText);
    this.reasoningBox.hidden = true;
    this.contentText = element("p", "content");
    this.callsBox = element("div", "tool-calls");
    item.append(this.reasoningBox, this.contentText, this.callsBox);
    item.dataset.state = "streaming";
    item.setAttribute("aria-busy", "true");
  }

  add(delta) {
    if (delta.reasoning_content) {
      this.reasoning += delta.reasoning_content;
      this.reasoningText.textContent = this.reasoning;
      this.reasoningBox.hidden = false;
    }
    if (delta.content) {
      this.content += delta.content;
      this.contentText.textContent = this.content;
    }
    this.item.scrollIntoView({ block: "end" });
    for (const part of delta.tool_calls || []) this.addCall(part);
  }

  addCall(part) {
    let call = this.calls[part.index];
    if (!call) {
      const box = element("div", "tool-call");
      const name = element("p", "name");
      const args = element("pre", "arguments");
      box.append(name, args);
      this.callsBox.append(box);
      call = { id: part.id, name: "", arguments: "", nameView: name, argumentsView: args };
      this.calls[part.index] = call;
    }
    const fn = part.function || {};
    if (part.id) call.id = part.id;
    if (fn.name) call.name += fn.name;
    if (fn.arguments) call.arguments += fn.arguments;
    call.nameView.textContent = "Tool call: " + call.name;
    call.argumentsView.textContent = call.arguments;
  }

  finish(state, reason) {
    for (const call of this.calls.filter(Boolean)) {
      try {
        call.argumentsView.textContent = JSON.stringify(JSON.parse(call.arguments), null, 2);
      } catch {
        // Arguments that are not JSON are shown as they came.
      }
    }
    if (reason) this.item.append(element("p", "finish", "finish: " + reason));
    this.item.dataset.state = state;
    this.item.removeAttribute("aria-busy");
    this.item.scrollIntoView({ block: "end" });
  }

  // The reply as a message of the history sent back with the next question.
  message() {
    const message = { role: "assistant", content: this.content };
    const calls = this.calls.filter(Boolean);
    if (calls.length) {
      message.tool_calls = calls.map((call) => ({
        id: call.id,
        type: "function",
        function: { name: call.name, arguments: call.arguments },
      }));
    }
    return message;
  }
}

function requestBody() {
  const messages = [];
  if (systemInput.value.trim()) messages.push({ role: "system", content: systemInput.value });
  const body = { model, messages: messages.concat(history), stream: true };
  if (temperatureInput.value !== "") body.temperature = Number(temperatureInput.value);
  if (maxTokensInput.value !== "") body.max_tokens = Number(maxTokensInput.value);
  if (thinkingInput.checked) body.chat_template_kwargs = { enable_thinking: true };
  if (toolsInput.value.trim()) {
    try {
      body.tools = JSON.parse(toolsInput.value);
    } catch (error) {
      throw new Error("the tools are not JSON: " + error.message);
    }
    body.tool_choice = toolChoiceInput.value;
  }
  return body;
}

// Reads the server-sent events of `response` into `reply`; returns the finish reason, and
// throws with the server's message for an error event.
async function readStream(response, reply) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let reason = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return reason;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart())
        .join("\n");
      if (!data) continue;
      if (data === "[DONE]") return reason;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(errorText(chunk));
      for (const choice of chunk.choices || []) {
        if (choice.index !== 0) continue;
        reply.add(choice.delta || {});
        if (choice.finish_reason) reason = choice.finish_reason;
      }
    }
  }
}

async function send(text) {
  const userItem = addMessage("user");
  userItem.append(element("p", "content", text));
  history.push({ role: "user", content: text });
  const reply = new Reply(addMessage("assistant"));
  running = new AbortController();
  sendButton.disabled = true;
  stopButton.disabled = false;
  try {
    if (!model) await loadModel();
    const response = await fetch("v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(requestBody()),
      signal: running.signal,
    });
    if (!response.ok) throw await failure(response);
    reply.finish("done", await readStream(response, reply));
    history.push(reply.message());
  } catch (error) {
    if (error.name === "AbortError") {
      reply.finish("done", "stopped");
      history.push(reply.message());
    } else {
      // The question stays on screen but leaves the history: it got no answer.
      history.pop();
      showError(reply.item, error.message);
      reply.finish("error", null);
    }
  } finally {
    running = null;
    sendButton.disabled = false;
    stopButton.disabled = true;
  }
}

composer.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = promptBox.value.trim();
  if (!text || running) return;
  promptBox.value = "";
  send(text);
});

promptBox.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    composer.requestSubmit();
  }
});

stopButton.addEventListener("click", () => running && running.abort());

clearButton.addEventListener("click", () => {
  if (running) running.abort();
  history = [];
  conversation.replaceChildren();
  promptBox.focus();
});

keyInput.value = localStorage.getItem(KEY_STORAGE) || "";
keyInput.addEventListener("change", () => {
  localStorage.setItem(KEY_STORAGE, keyInput.value.trim());
  showModel();
});

showModel();
