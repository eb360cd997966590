//! Replies laid out for Telegram: HTML parse mode with every piece of text escaped, and split into
//! messages of at most 4096 characters (Telegram's limit, counted in UTF-16 code units of the
//! text as shown, so markup does not count) at line boundaries where possible.

/// Telegram's longest message text.
pub const MAX_MESSAGE: usize = 4096;

/// Text escaped for Telegram's HTML parse mode.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Span {
    text: String,
    bold: bool,
    code: bool,
}

/// A reply being built, line by line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reply {
    lines: Vec<Vec<Span>>,
}

impl Reply {
    pub fn new() -> Self {
        Self::default()
    }

    /// A reply of one plain line.
    pub fn text(text: impl Into<String>) -> Self {
        let mut reply = Self::new();
        reply.line(text);
        reply
    }

    /// A new line of plain text (which may itself hold newlines).
    pub fn line(&mut self, text: impl Into<String>) -> &mut Self {
        for part in text.into().split('\n') {
            self.lines.push(vec![Span {
                text: part.to_owned(),
                bold: false,
                code: false,
            }]);
        }
        self
    }

    /// A new line in bold.
    pub fn heading(&mut self, text: impl Into<String>) -> &mut Self {
        self.lines.push(vec![Span {
            text: text.into().replace('\n', " "),
            bold: true,
            code: false,
        }]);
        self
    }

    /// Appends plain text to the current line.
    pub fn push(&mut self, text: impl Into<String>) -> &mut Self {
        self.span(text.into(), false, false)
    }

    /// Appends monospace text (ids to copy) to the current line.
    pub fn code(&mut self, text: impl Into<String>) -> &mut Self {
        self.span(text.into(), false, true)
    }

    fn span(&mut self, text: String, bold: bool, code: bool) -> &mut Self {
        let span = Span {
            text: text.replace('\n', " "),
            bold,
            code,
        };
        match self.lines.last_mut() {
            Some(line) => line.push(span),
            None => self.lines.push(vec![span]),
        }
        self
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// The messages to send, in order: each at most [`MAX_MESSAGE`] shown characters, as HTML.
    pub fn render(&self) -> Vec<String> {
        split(&self.lines, MAX_MESSAGE)
    }
}

fn shown(text: &str) -> usize {
    text.encode_utf16().count()
}

fn render_span(span: &Span) -> String {
    let text = escape(&span.text);
    match (span.bold, span.code) {
        (true, _) => format!("<b>{text}</b>"),
        (false, true) => format!("<code>{text}</code>"),
        (false, false) => text,
    }
}

/// Packs lines into messages of at most `limit` shown characters (newlines count); a line longer
/// than `limit` is cut between characters.
fn split(lines: &[Vec<Span>], limit: usize) -> Vec<String> {
    let mut messages = Vec::new();
    let mut current = String::new();
    let mut used = 0;
    for line in lines {
        let length: usize = line.iter().map(|s| shown(&s.text)).sum();
        let sep = usize::from(used > 0);
        if used + sep + length <= limit {
            if sep == 1 {
                current.push('\n');
            }
            current.extend(line.iter().map(render_span));
            used += sep + length;
            continue;
        }
        if used > 0 {
            messages.push(std::mem::take(&mut current));
            used = 0;
        }
        // The line alone: whole if it fits, else in pieces.
        for span in line {
            let mut piece = String::new();
            let mut piece_len = 0;
            for c in span.text.chars() {
                let width = c.len_utf16();
                if used + piece_len + width > limit {
                    current.push_str(&render_span(&Span {
                        text: std::mem::take(&mut piece),
                        ..span.clone()
                    }));
                    messages.push(std::mem::take(&mut current));
                    used = 0;
                    piece_len = 0;
                }
                piece.push(c);
                piece_len += width;
            }
            used += piece_len;
            current.push_str(&render_span(&Span {
                text: piece,
                ..span.clone()
            }));
        }
    }
    if !current.is_empty() || messages.is_empty() {
        messages.push(current);
    }
    messages
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text a message shows: markup removed, entities decoded.
    fn shown_text(html: &str) -> String {
        let mut out = String::new();
        let mut in_tag = false;
        for c in html.chars() {
            match c {
                '<' => in_tag = true,
                '>' if in_tag => in_tag = false,
                c if !in_tag => out.push(c),
                _ => {}
            }
        }
        out.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&")
    }

    #[test]
    fn text_is_escaped_and_marked_up() {
        let mut reply = Reply::new();
        reply.heading("S1 <ops> & co").line("x < y ").code("id-1");
        assert_eq!(
            reply.render(),
            vec!["<b>S1 &lt;ops&gt; &amp; co</b>\nx &lt; y <code>id-1</code>"]
        );
    }

    #[test]
    fn long_replies_split_at_lines_within_the_limit() {
        let mut reply = Reply::new();
        for i in 0..400 {
            reply.line(format!("line {i:03} <&> with some words to fill it"));
        }
        let messages = reply.render();
        assert!(messages.len() > 1);
        let mut all = Vec::new();
        for m in &messages {
            let text = shown_text(m);
            assert!(text.encode_utf16().count() <= MAX_MESSAGE, "{}", text.len());
            all.extend(text.split('\n').map(str::to_owned));
        }
        assert_eq!(all.len(), 400, "no line lost or cut");
        assert_eq!(all[399], "line 399 <&> with some words to fill it");
    }

    #[test]
    fn a_line_longer_than_the_limit_is_cut_between_characters() {
        // Astral characters take two UTF-16 units each.
        let long: String = "ab😀".repeat(3000);
        let messages = Reply::text(long.clone()).render();
        assert!(messages.len() >= 3);
        let joined: String = messages.iter().map(|m| shown_text(m)).collect();
        assert_eq!(joined, long);
        for m in &messages {
            assert!(shown_text(m).encode_utf16().count() <= MAX_MESSAGE);
        }
    }

    #[test]
    fn an_empty_reply_is_one_empty_message() {
        assert_eq!(Reply::new().render(), vec![String::new()]);
    }
}
