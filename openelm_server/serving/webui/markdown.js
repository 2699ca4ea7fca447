// A small Markdown renderer for the model's answers: fenced and inline code, headings, lists,
// bold, italic, http(s) links, paragraphs. The whole text is HTML-escaped first, so whatever the
// model writes (<script>, <img onerror=...>) stays text; only the tags added here are markup.

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

export function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

// Applied to already-escaped text: the patterns can only wrap it, never open a tag of its own.
function inline(escaped) {
  return escaped
    .split(/(`[^`\n]+`)/)
    .map((part, i) => {
      if (i % 2 === 1) return `<code>${part.slice(1, -1)}</code>`;
      return part
        .replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g,
          '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>')
        .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
        .replace(/(^|[^*])\*([^*\n]+)\*/g, "$1<em>$2</em>");
    })
    .join("");
}

function blocks(escaped) {
  const html = [];
  let paragraph = [];
  let list = null; // {tag, items}
  const flushParagraph = () => {
    if (paragraph.length) html.push(`<p>${paragraph.map(inline).join("<br>")}</p>`);
    paragraph = [];
  };
  const flushList = () => {
    if (list) html.push(`<${list.tag}>${list.items.map((item) => `<li>${inline(item)}</li>`).join("")}</${list.tag}>`);
    list = null;
  };
  for (const line of escaped.split("\n")) {
    const heading = /^(#{1,6})\s+(.*)$/.exec(line);
    const bullet = /^\s*[-*+]\s+(.*)$/.exec(line);
    const numbered = /^\s*\d+[.)]\s+(.*)$/.exec(line);
    if (heading) {
      flushParagraph(); flushList();
      const level = Math.min(heading[1].length + 2, 6); // h3..h6: answers sit under the page's title
      html.push(`<h${level}>${inline(heading[2])}</h${level}>`);
    } else if (bullet || numbered) {
      flushParagraph();
      const tag = bullet ? "ul" : "ol";
      if (list && list.tag !== tag) flushList();
      list = list || { tag, items: [] };
      list.items.push((bullet || numbered)[1]);
    } else if (line.trim() === "") {
      flushParagraph(); flushList();
    } else {
      flushList();
      paragraph.push(line);
    }
  }
  flushParagraph(); flushList();
  return html.join("");
}

// A fence still open while the answer streams in shows as code up to the end.
const FENCE = /```[^\n`]*\n?([\s\S]*?)(?:```|$)/g; // the language name after ``` is dropped

export function renderMarkdown(text) {
  const escaped = escapeHtml(text);
  const html = [];
  let last = 0;
  for (const match of escaped.matchAll(FENCE)) {
    html.push(blocks(escaped.slice(last, match.index)));
    html.push(`<pre><code>${match[1]}</code></pre>`);
    last = match.index + match[0].length;
  }
  html.push(blocks(escaped.slice(last)));
  return html.join("");
}
