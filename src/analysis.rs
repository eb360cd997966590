//! Episode analysis: what the background job stores in `episodes.analysis` about the observations,
//! reports and meeting notes a tenant records.
//!
//! Everything sits behind the [`Analyzer`] trait so that an LLM-backed analyzer can be added next to
//! the deterministic [`TextAnalyzer`] without touching the job. The text analyzer is pure: the same
//! episode and corpus give the same JSON, byte for byte, and no input panics it.
//!
//! What [`analyze_text`] measures, and how:
//!
//! - **Entities** (`urls`, `emails`, `mentions`, `tags`) are found by hand-written scanners, in
//!   this order, each ignoring text the earlier ones claimed: `http(s)://` URLs (trailing
//!   punctuation and unbalanced closing brackets trimmed, so Wikipedia-style parentheses survive),
//!   `local@domain.tld` emails, `@handle` mentions (1–64 letters, digits or `_`, not preceded by a
//!   word character, never part of an email) and `#tag`s (letters, digits, `_`, inner `-`, at least
//!   one letter, at most 64 characters, not preceded by a word character or `&`, so `C#`, `#42`
//!   and HTML entities are not tags). Lists keep first appearance (title before content), are
//!   deduplicated (case-insensitively except URLs), and hold at most 100 entries. Mentions and tags
//!   are lowercased without their sigil; URLs and emails are kept as written.
//! - **Words** are runs of letters and digits (with combining marks), joined across a single
//!   apostrophe, hyphen or underscore between letters (`don't`, `well-known`, `snake_case`) and a
//!   `.` or `,` between digits (`3.5`, `1,000`). A URL, email or mention counts as exactly one word.
//! - **Sentences** end at a run of `.`, `!`, `?` or `…` (optionally followed by closing quotes or
//!   brackets) that is followed by whitespace or the end of the text, and at every line break that
//!   ends a line holding words (paragraphs, bullet lists, headings). CJK full stops end a sentence
//!   without needing a space. Dots inside URLs, emails and numbers never end one; a single `.`
//!   after a title such as `Mr`/`Dr` or after `e.g`/`i.e` never does, and after `etc`-like
//!   abbreviations only when the next word is not lowercase. A sentence needs at least one word.
//! - **Keywords** are TF-IDF ranked terms of title and content against the tenant's other episodes.
//!   A term is a lowercased word (curly apostrophes made straight, a possessive `'s` dropped) with
//!   3 to 64 characters, at least one letter, and not an English stopword; words inside URLs,
//!   emails and mentions are not terms, but a tag's word is. Once an episode has more than 50
//!   distinct terms, terms seen only once fill only the places repeated terms leave free.
//!
//! Counts (words, sentences, characters, reading time) are of the content only.

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};
use std::ops::Range;

use futures::future::BoxFuture;
use serde::Serialize;

/// The text analyzer's name, stored as `"analyzer"` in its output.
const TEXT_ANALYZER_NAME: &str = "text";
/// Bumped whenever the text analyzer's output changes for the same input.
const TEXT_ANALYSIS_VERSION: u32 = 1;
const MAX_KEYWORDS: usize = 10;
/// Above this many distinct terms, terms seen once are only used to fill empty keyword places.
const SINGLETON_THRESHOLD: usize = 50;
const MAX_ENTITIES: usize = 100;
const WORDS_PER_MINUTE: u64 = 200;
const MIN_TERM_CHARS: usize = 3;
/// Longer "words" are hashes, encoded blobs or pasted junk, not keywords.
const MAX_TERM_CHARS: usize = 64;
const MAX_HANDLE_CHARS: usize = 64;
const MAX_TAG_CHARS: usize = 64;
/// RFC 5321 limits; longer runs around an `@` are not addresses.
const MAX_EMAIL_LOCAL_CHARS: usize = 64;
const MAX_EMAIL_DOMAIN_CHARS: usize = 253;
/// Longer than any abbreviation below, so the look-back before a dot stays short.
const MAX_ABBREVIATION_CHARS: usize = 8;

/// One titled text: the episode being analysed, or one of the tenant's other episodes.
#[derive(Clone, Copy, Debug)]
pub struct Document<'a> {
    pub title: &'a str,
    pub content: &'a str,
}

/// Something that turns an episode into the JSON stored in `episodes.analysis`.
///
/// The returned value is a JSON object stored as-is; it must contain `"analyzer": <name>` (the
/// value of [`Analyzer::name`]) so readers know which analyzer, and which shape, they hold.
/// The future is boxed because analyzers backed by a model call out over the network.
pub trait Analyzer: Send + Sync + 'static {
    /// A short stable name, stored as `"analyzer"` in every value this analyzer returns.
    fn name(&self) -> &'static str;

    /// Analyses `episode`; `corpus` holds the tenant's other (recent) episodes, for comparison.
    fn analyze<'a>(
        &'a self,
        episode: Document<'a>,
        corpus: &'a [Document<'a>],
    ) -> BoxFuture<'a, Result<serde_json::Value, AnalysisError>>;
}

/// Why an analysis failed, and whether trying again later may help.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct AnalysisError {
    pub message: String,
    pub retryable: bool,
}

impl AnalysisError {
    /// A failure that may pass on a later attempt (a timeout, a rate limit).
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
        }
    }

    /// A failure that will repeat for the same input.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
        }
    }
}

/// The deterministic analyzer: counts, entities and TF-IDF keywords (see the module docs).
#[derive(Debug, Default, Clone, Copy)]
pub struct TextAnalyzer;

impl Analyzer for TextAnalyzer {
    fn name(&self) -> &'static str {
        TEXT_ANALYZER_NAME
    }

    fn analyze<'a>(
        &'a self,
        episode: Document<'a>,
        corpus: &'a [Document<'a>],
    ) -> BoxFuture<'a, Result<serde_json::Value, AnalysisError>> {
        // The work runs when the future is first polled, not when it is built.
        Box::pin(async move {
            serde_json::to_value(analyze_text(episode, corpus))
                .map_err(|e| AnalysisError::permanent(format!("serialising text analysis: {e}")))
        })
    }
}

/// What [`TextAnalyzer`] stores for an episode.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TextAnalysis {
    /// Always `"text"`.
    pub analyzer: &'static str,
    /// The output version, `1`.
    pub version: u32,
    pub word_count: usize,
    pub sentence_count: usize,
    /// Unicode scalar values in the content.
    pub character_count: usize,
    /// At 200 words a minute, rounded up.
    pub reading_time_seconds: u64,
    pub top_keywords: Vec<Keyword>,
    pub urls: Vec<String>,
    pub emails: Vec<String>,
    pub mentions: Vec<String>,
    pub tags: Vec<String>,
}

/// A term that characterises an episode compared with the tenant's other episodes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Keyword {
    pub term: String,
    /// Occurrences in the episode's title and content.
    pub count: usize,
    /// `count * (ln((1 + N) / (1 + df)) + 1)`, rounded to 4 decimals.
    pub score: f64,
}

/// Analyses `episode` against `corpus` (the tenant's other episodes); see the module docs.
pub fn analyze_text(episode: Document<'_>, corpus: &[Document<'_>]) -> TextAnalysis {
    let title = Entities::scan(episode.title);
    let content = Entities::scan(episode.content);
    let title_opaque = title.opaque_spans();
    let content_opaque = content.opaque_spans();

    let word_count = Words::new(episode.content, &content_opaque).count() + content_opaque.len();
    let word_count_u64 = u64::try_from(word_count).unwrap_or(u64::MAX);
    let texts = [(episode.title, &title), (episode.content, &content)];

    TextAnalysis {
        analyzer: TEXT_ANALYZER_NAME,
        version: TEXT_ANALYSIS_VERSION,
        word_count,
        sentence_count: count_sentences(episode.content, &content_opaque),
        character_count: episode.content.chars().count(),
        reading_time_seconds: word_count_u64.saturating_mul(60).div_ceil(WORDS_PER_MINUTE),
        top_keywords: top_keywords(
            [
                (episode.title, &title_opaque),
                (episode.content, &content_opaque),
            ],
            corpus,
        ),
        urls: distinct(
            texts
                .iter()
                .flat_map(|(t, e)| slices(t, &e.urls))
                .map(str::to_owned),
        ),
        emails: distinct(
            texts
                .iter()
                .flat_map(|(t, e)| slices(t, &e.emails))
                .map(str::to_owned),
        ),
        mentions: distinct(
            texts
                .iter()
                .flat_map(|(t, e)| slices(t, &e.mentions))
                .map(sigil_free_lower),
        ),
        tags: distinct(
            texts
                .iter()
                .flat_map(|(t, e)| slices(t, &e.tags))
                .map(sigil_free_lower),
        ),
    }
}

fn slices<'t>(text: &'t str, spans: &'t [Range<usize>]) -> impl Iterator<Item = &'t str> + 't {
    spans.iter().filter_map(move |span| text.get(span.clone()))
}

/// `@Handle` or `#Tag` to `handle` or `tag`.
fn sigil_free_lower(entity: &str) -> String {
    entity.get(1..).unwrap_or_default().to_lowercase()
}

/// First appearances, compared case-insensitively, at most [`MAX_ENTITIES`].
fn distinct(items: impl Iterator<Item = String>) -> Vec<String> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for item in items {
        if out.len() == MAX_ENTITIES {
            break;
        }
        if seen.insert(item.to_lowercase()) {
            out.push(item);
        }
    }
    out
}

// ----- Entities -----

/// Byte ranges of the entities in one text, each list in text order and non-overlapping.
#[derive(Debug, Default)]
struct Entities {
    urls: Vec<Range<usize>>,
    emails: Vec<Range<usize>>,
    /// `@` included.
    mentions: Vec<Range<usize>>,
    /// `#` included.
    tags: Vec<Range<usize>>,
}

impl Entities {
    fn scan(text: &str) -> Self {
        let urls = find_urls(text);
        let emails = find_emails(text, &urls);
        let mut claimed: Vec<Range<usize>> = urls.iter().chain(&emails).cloned().collect();
        claimed.sort_by_key(|span| span.start);
        // `&` before `#` is an HTML character reference, not a tag.
        let mentions = find_sigiled(text, &claimed, '@', |c| !is_handle_char(c), handle_len);
        let tags = find_sigiled(
            text,
            &claimed,
            '#',
            |c| !is_handle_char(c) && c != '&',
            tag_len,
        );
        Self {
            urls,
            emails,
            mentions,
            tags,
        }
    }

    /// Spans that count as one word each and hide their insides from keywords and sentences.
    fn opaque_spans(&self) -> Vec<Range<usize>> {
        let mut spans: Vec<Range<usize>> = self
            .urls
            .iter()
            .chain(&self.emails)
            .chain(&self.mentions)
            .cloned()
            .collect();
        spans.sort_by_key(|span| span.start);
        spans
    }
}

/// Whether `pos` lies inside one of the sorted, non-overlapping `spans`.
fn inside(spans: &[Range<usize>], pos: usize) -> bool {
    let next = spans.partition_point(|span| span.end <= pos);
    spans.get(next).is_some_and(|span| span.start <= pos)
}

/// Whether `range` shares a byte with one of the sorted, non-overlapping `spans`.
fn overlaps(spans: &[Range<usize>], range: &Range<usize>) -> bool {
    let next = spans.partition_point(|span| span.end <= range.start);
    spans.get(next).is_some_and(|span| span.start < range.end)
}

fn char_before(text: &str, pos: usize) -> Option<char> {
    text.get(..pos)?.chars().next_back()
}

fn ends_with_ignore_ascii_case(haystack: &[u8], suffix: &[u8]) -> bool {
    let tail = haystack
        .len()
        .checked_sub(suffix.len())
        .and_then(|at| haystack.get(at..));
    tail.is_some_and(|tail| tail.eq_ignore_ascii_case(suffix))
}

fn find_urls(text: &str) -> Vec<Range<usize>> {
    let mut spans = Vec::new();
    let mut resume = 0;
    for (colon, _) in text.match_indices("://") {
        // The scheme is ASCII, so `start` is a char boundary whenever it matches.
        let head = text.as_bytes().get(..colon).unwrap_or_default();
        let scheme_len = if ends_with_ignore_ascii_case(head, b"https") {
            5
        } else if ends_with_ignore_ascii_case(head, b"http") {
            4
        } else {
            continue;
        };
        let start = colon - scheme_len;
        if start < resume || char_before(text, start).is_some_and(char::is_alphanumeric) {
            continue;
        }
        if let Some(end) = url_end(text, colon + 3) {
            spans.push(start..end);
            resume = end;
        }
    }
    spans
}

fn is_url_char(c: char) -> bool {
    !c.is_whitespace()
        && !c.is_control()
        && !matches!(c, '<' | '>' | '"' | '`' | '“' | '”' | '‘' | '«' | '»')
}

/// Where the URL whose scheme ends at `body_start` ends, if it has a host.
fn url_end(text: &str, body_start: usize) -> Option<usize> {
    let rest = text.get(body_start..)?;
    // Checking the host first keeps repeated hostless schemes linear: a host without a letter or
    // digit cannot hold the next scheme, and trimming below never removes a letter or digit.
    let host_len = rest.find(|c: char| !is_url_char(c) || matches!(c, '/' | '?' | '#'));
    let host = rest.get(..host_len.unwrap_or(rest.len()))?;
    if !host.chars().any(char::is_alphanumeric) {
        return None;
    }
    let body_len = rest.find(|c: char| !is_url_char(c)).unwrap_or(rest.len());
    let mut body = rest.get(..body_len)?;
    let count = |body: &str, c: char| body.chars().filter(|&x| x == c).count();
    let mut unbalanced = [
        (')', count(body, ')').saturating_sub(count(body, '('))),
        (']', count(body, ']').saturating_sub(count(body, '['))),
        ('}', count(body, '}').saturating_sub(count(body, '{'))),
    ];
    while let Some(last) = body.chars().next_back() {
        let strip = match last {
            '.' | ',' | ':' | ';' | '!' | '?' | '\'' | '’' | '*' => true,
            _ => match unbalanced.iter_mut().find(|(closer, _)| *closer == last) {
                Some((_, excess)) if *excess > 0 => {
                    *excess -= 1;
                    true
                }
                _ => false,
            },
        };
        if !strip {
            break;
        }
        body = body.get(..body.len() - last.len_utf8())?;
    }
    Some(body_start + body.len())
}

fn is_email_local_char(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '.' | '_' | '%' | '+' | '-')
}

fn is_domain_char(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '.' | '-')
}

fn find_emails(text: &str, urls: &[Range<usize>]) -> Vec<Range<usize>> {
    let mut spans: Vec<Range<usize>> = Vec::new();
    for (at, _) in text.match_indices('@') {
        if inside(urls, at) {
            continue;
        }
        // The local part may not reach back into an earlier URL or email.
        let urls_before = urls.partition_point(|span| span.end <= at);
        let floor = urls_before
            .checked_sub(1)
            .and_then(|i| urls.get(i))
            .map_or(0, |span| span.end)
            .max(spans.last().map_or(0, |span| span.end));
        if at < floor {
            continue;
        }
        if let (Some(start), Some(end)) = (email_start(text, floor, at), email_end(text, at + 1)) {
            spans.push(start..end);
        }
    }
    spans
}

/// Where the local part before the `@` at `at` starts, if it is a plausible one.
fn email_start(text: &str, floor: usize, at: usize) -> Option<usize> {
    let before = text.get(floor..at)?;
    let mut start = at;
    for (taken, (i, c)) in before.char_indices().rev().enumerate() {
        if !is_email_local_char(c) {
            break;
        }
        if taken == MAX_EMAIL_LOCAL_CHARS {
            return None;
        }
        start = floor + i;
    }
    let local = text.get(start..at)?.trim_start_matches('.');
    let plausible = local.chars().any(char::is_alphanumeric) && !local.ends_with('.');
    plausible.then_some(at - local.len())
}

/// Where the domain starting at `from` (just after the `@`) ends, if it is a plausible one.
fn email_end(text: &str, from: usize) -> Option<usize> {
    let after = text.get(from..)?;
    let mut len = 0;
    for (taken, (i, c)) in after.char_indices().enumerate() {
        if !is_domain_char(c) {
            break;
        }
        if taken > MAX_EMAIL_DOMAIN_CHARS {
            return None;
        }
        len = i + c.len_utf8();
    }
    let domain = after.get(..len)?.trim_end_matches(['.', '-']);
    let labels: Vec<&str> = domain.split('.').collect();
    let valid_labels = labels.len() >= 2
        && labels.iter().all(|label| {
            !label.is_empty()
                && label.chars().count() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    let tld = labels.last().copied().unwrap_or_default();
    let valid_tld = tld.chars().count() >= 2 && tld.chars().all(char::is_alphabetic);
    (valid_labels && valid_tld).then_some(from + domain.len())
}

fn is_handle_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Spans of `sigil` plus the entity `entity_len` finds after it, where the character before the
/// sigil (if any) passes `may_follow` and the span stays clear of `claimed` text.
fn find_sigiled(
    text: &str,
    claimed: &[Range<usize>],
    sigil: char,
    may_follow: fn(char) -> bool,
    entity_len: fn(&str) -> Option<usize>,
) -> Vec<Range<usize>> {
    let mut spans = Vec::new();
    for (pos, _) in text.match_indices(sigil) {
        if inside(claimed, pos) || char_before(text, pos).is_some_and(|c| !may_follow(c)) {
            continue;
        }
        let after = pos + sigil.len_utf8();
        if let Some(len) = text.get(after..).and_then(entity_len) {
            let span = pos..after + len;
            if !overlaps(claimed, &span) {
                spans.push(span);
            }
        }
    }
    spans
}

/// Byte length of the handle at the start of `rest`, if there is a valid one.
fn handle_len(rest: &str) -> Option<usize> {
    let mut len = 0;
    for (taken, c) in rest.chars().enumerate() {
        if !is_handle_char(c) {
            break;
        }
        if taken == MAX_HANDLE_CHARS {
            return None;
        }
        len += c.len_utf8();
    }
    (len > 0).then_some(len)
}

/// Byte length of the tag at the start of `rest`, if there is a valid one.
fn tag_len(rest: &str) -> Option<usize> {
    if !rest.chars().next().is_some_and(is_handle_char) {
        return None;
    }
    let mut len = 0;
    for (taken, c) in rest.chars().enumerate() {
        if !(is_handle_char(c) || c == '-') {
            break;
        }
        if taken == MAX_TAG_CHARS {
            return None;
        }
        len += c.len_utf8();
    }
    let tag = rest.get(..len)?.trim_end_matches('-');
    tag.chars().any(char::is_alphabetic).then_some(tag.len())
}

// ----- Words -----

/// Combining marks that `char::is_alphanumeric` misses but that belong inside a word: generic
/// diacritics, Hebrew and Arabic points, Indic viramas and nuktas, and zero-width joiners.
fn is_inner_mark(c: char) -> bool {
    matches!(c,
        '\u{0300}'..='\u{036F}'
        | '\u{0483}'..='\u{0489}'
        | '\u{0591}'..='\u{05C7}'
        | '\u{0610}'..='\u{061A}'
        | '\u{064B}'..='\u{065F}'
        | '\u{0670}'
        | '\u{06D6}'..='\u{06ED}'
        | '\u{0900}'..='\u{0963}'
        | '\u{0966}'..='\u{0DFF}'
        | '\u{1AB0}'..='\u{1AFF}'
        | '\u{1DC0}'..='\u{1DFF}'
        | '\u{200C}'..='\u{200D}'
        | '\u{20D0}'..='\u{20FF}'
        | '\u{FE20}'..='\u{FE2F}')
}

/// The words of a text outside its opaque spans (see the module docs for what a word is).
struct Words<'t> {
    text: &'t str,
    pos: usize,
    /// Sorted opaque spans not yet passed.
    opaque: &'t [Range<usize>],
}

impl<'t> Words<'t> {
    fn new(text: &'t str, opaque: &'t [Range<usize>]) -> Self {
        Self {
            text,
            pos: 0,
            opaque,
        }
    }
}

impl<'t> Iterator for Words<'t> {
    type Item = &'t str;

    fn next(&mut self) -> Option<&'t str> {
        loop {
            while let Some((first, rest)) = self.opaque.split_first() {
                if first.end <= self.pos {
                    self.opaque = rest;
                } else if first.start <= self.pos {
                    self.pos = first.end;
                    self.opaque = rest;
                } else {
                    break;
                }
            }
            let limit = self
                .opaque
                .first()
                .map_or(self.text.len(), |span| span.start);
            let segment = self.text.get(self.pos..limit)?;
            let Some(offset) = segment.find(char::is_alphanumeric) else {
                if limit == self.text.len() {
                    self.pos = limit;
                    return None;
                }
                self.pos = limit;
                continue;
            };
            let word_start = self.pos + offset;
            let word = segment.get(offset..).map(word_prefix)?;
            self.pos = word_start + word.len();
            return Some(word);
        }
    }
}

/// The word at the start of `segment`, which starts with a letter or digit.
fn word_prefix(segment: &str) -> &str {
    let mut end = 0;
    let mut prev: Option<char> = None;
    let mut chars = segment.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let next = chars.peek().map(|&(_, n)| n);
        let continues = c.is_alphanumeric()
            || (prev.is_some() && is_inner_mark(c))
            || match c {
                '\'' | '’' | '-' | '‐' | '_' => {
                    prev.is_some_and(|p| p.is_alphanumeric() || is_inner_mark(p))
                        && next.is_some_and(char::is_alphanumeric)
                }
                '.' | ',' => {
                    prev.is_some_and(char::is_numeric) && next.is_some_and(char::is_numeric)
                }
                _ => false,
            };
        if !continues {
            break;
        }
        end = i + c.len_utf8();
        prev = Some(c);
    }
    segment.get(..end).unwrap_or_default()
}

// ----- Sentences -----

fn is_terminator(c: char) -> bool {
    matches!(
        c,
        '.' | '!' | '?' | '…' | '‼' | '⁇' | '⁈' | '⁉' | '؟' | '。' | '！' | '？'
    )
}

/// CJK punctuation ends a sentence without a following space.
fn is_spaceless_terminator(c: char) -> bool {
    matches!(c, '。' | '！' | '？')
}

fn is_closer(c: char) -> bool {
    matches!(c, '"' | '\'' | '”' | '’' | ')' | ']' | '»' | '」' | '』')
}

fn is_line_break(c: char) -> bool {
    matches!(
        c,
        '\n' | '\u{0B}' | '\u{0C}' | '\u{85}' | '\u{2028}' | '\u{2029}'
    )
}

fn count_sentences(text: &str, opaque: &[Range<usize>]) -> usize {
    let mut count = 0;
    // Whether the sentence under way holds a word yet.
    let mut open = false;
    let mut opaque = opaque.iter().peekable();
    let mut pos = 0;
    while let Some(rest) = text.get(pos..) {
        let Some(c) = rest.chars().next() else {
            break;
        };
        if let Some(span) = opaque.next_if(|span| span.start <= pos) {
            if span.end > pos {
                open = true;
                pos = span.end;
            }
            continue;
        }
        if is_line_break(c) {
            count += usize::from(open);
            open = false;
            pos += c.len_utf8();
        } else if is_terminator(c) {
            let run_len = rest.find(|c: char| !is_terminator(c)).unwrap_or(rest.len());
            let run = rest.get(..run_len).unwrap_or_default();
            let after_run = rest.get(run_len..).unwrap_or_default();
            let closers_len = after_run
                .find(|c: char| !is_closer(c))
                .unwrap_or(after_run.len());
            let after = after_run.get(closers_len..).unwrap_or_default();
            let ends = after.chars().next().is_none_or(char::is_whitespace)
                || run.chars().any(is_spaceless_terminator);
            if ends && open && !(run == "." && abbreviation_dot(text, pos, after)) {
                count += 1;
                open = false;
            }
            pos += run_len + closers_len;
        } else {
            open |= c.is_alphanumeric();
            pos += c.len_utf8();
        }
    }
    count + usize::from(open)
}

/// Abbreviations whose dot never ends a sentence (they precede a name or an example).
const ABBREVIATIONS_BEFORE: &[&str] = &[
    "cf", "dr", "e.g", "i.e", "mr", "mrs", "ms", "mt", "prof", "rev", "st", "vs",
];
/// Abbreviations whose dot ends a sentence only when the next word is not lowercase.
const ABBREVIATIONS_ANYWHERE: &[&str] = &[
    "al", "approx", "co", "corp", "dept", "est", "etc", "fig", "inc", "jr", "ltd", "no", "sr",
    "vol",
];

/// Whether the `.` at `dot` belongs to an abbreviation; `after` is the text after it.
fn abbreviation_dot(text: &str, dot: usize, after: &str) -> bool {
    let before = text.get(..dot).unwrap_or_default();
    let token_len: usize = before
        .chars()
        .rev()
        .take_while(|&c| c.is_alphanumeric() || c == '.')
        .take(MAX_ABBREVIATION_CHARS + 1)
        .map(char::len_utf8)
        .sum();
    let token = before
        .get(before.len() - token_len..)
        .unwrap_or_default()
        .to_lowercase();
    if ABBREVIATIONS_BEFORE.binary_search(&token.as_str()).is_ok() {
        return true;
    }
    let next = after
        .chars()
        .find(|&c| !c.is_whitespace() || is_line_break(c));
    ABBREVIATIONS_ANYWHERE
        .binary_search(&token.as_str())
        .is_ok()
        && next.is_some_and(|c| c.is_lowercase() || c.is_numeric())
}

// ----- Keywords -----

/// English words too common to characterise anything. Sorted, for `binary_search`.
#[rustfmt::skip]
const STOPWORDS: &[&str] = &[
    "a", "about", "above", "across", "after", "again", "against", "all", "almost", "along",
    "already", "also", "although", "always", "am", "among", "an", "and", "another", "any", "anyone",
    "anything", "are", "aren't", "around", "as", "at", "be", "because", "been", "before", "being",
    "below", "between", "both", "but", "by", "can", "can't", "cannot", "could", "couldn't", "did",
    "didn't", "do", "does", "doesn't", "doing", "don't", "done", "down", "during", "each", "either",
    "else", "even", "ever", "every", "few", "for", "from", "further", "get", "gets", "getting",
    "got", "had", "hadn't", "has", "hasn't", "have", "haven't", "having", "he", "her", "here",
    "hers", "herself", "him", "himself", "his", "how", "however", "i", "i'd", "i'll", "i'm", "i've",
    "if", "in", "into", "is", "isn't", "it", "its", "itself", "just", "let", "like", "many", "may",
    "me", "might", "more", "most", "much", "must", "mustn't", "my", "myself", "neither", "no",
    "nor", "not", "now", "of", "off", "often", "on", "once", "one", "only", "onto", "or", "other",
    "others", "ought", "our", "ours", "ourselves", "out", "over", "own", "per", "quite", "rather",
    "really", "said", "same", "say", "says", "shall", "shan't", "she", "should", "shouldn't",
    "since", "so", "some", "something", "still", "such", "than", "that", "the", "their", "theirs",
    "them", "themselves", "then", "there", "these", "they", "they'd", "they'll", "they're",
    "they've", "this", "those", "though", "through", "thus", "to", "too", "under", "until", "up",
    "upon", "us", "very", "via", "was", "wasn't", "we", "we'd", "we'll", "we're", "we've", "were",
    "weren't", "what", "when", "where", "whether", "which", "while", "who", "whom", "whose", "why",
    "will", "with", "within", "without", "won't", "would", "wouldn't", "yes", "yet", "you", "you'd",
    "you'll", "you're", "you've", "your", "yours", "yourself", "yourselves",
];

/// `word` as a term, written into `buf`: lowercased, straight apostrophes and hyphens, no
/// possessive `'s`; `None` if too short, too long or without a letter. Stopwords are not checked
/// here.
fn normalize_term<'b>(word: &str, buf: &'b mut String) -> Option<&'b str> {
    // Bytes bound chars from above, and a char is at most 4 bytes.
    if word.len() < MIN_TERM_CHARS || word.len() > 4 * MAX_TERM_CHARS {
        return None;
    }
    buf.clear();
    if word.is_ascii() {
        buf.push_str(word);
        buf.make_ascii_lowercase();
    } else {
        for c in word.chars() {
            match c {
                '’' => buf.push('\''),
                '‐' => buf.push('-'),
                c => buf.extend(c.to_lowercase()),
            }
        }
    }
    if buf.ends_with("'s") {
        buf.truncate(buf.len() - 2);
    }
    let term = buf.as_str();
    let length_ok = term.chars().nth(MIN_TERM_CHARS - 1).is_some()
        && term.chars().nth(MAX_TERM_CHARS).is_none();
    (length_ok && term.chars().any(char::is_alphabetic)).then_some(term)
}

#[derive(Debug)]
struct TermStats {
    count: usize,
    /// Corpus documents holding the term.
    document_frequency: usize,
    /// The last corpus document counted in `document_frequency`.
    last_document: Option<usize>,
}

/// The ranking order: score, then count (both descending), then term.
fn rank(a: &Keyword, b: &Keyword) -> Ordering {
    b.score
        .total_cmp(&a.score)
        .then_with(|| b.count.cmp(&a.count))
        .then_with(|| a.term.cmp(&b.term))
}

fn top_keywords(episode: [(&str, &[Range<usize>]); 2], corpus: &[Document<'_>]) -> Vec<Keyword> {
    let mut buf = String::new();
    let mut stats: HashMap<String, TermStats> = HashMap::new();
    for (text, opaque) in episode {
        for word in Words::new(text, opaque) {
            let Some(term) = normalize_term(word, &mut buf) else {
                continue;
            };
            if STOPWORDS.binary_search(&term).is_ok() {
                continue;
            }
            match stats.get_mut(term) {
                Some(entry) => entry.count += 1,
                None => {
                    let entry = TermStats {
                        count: 1,
                        document_frequency: 0,
                        last_document: None,
                    };
                    stats.insert(term.to_owned(), entry);
                }
            }
        }
    }
    if stats.is_empty() {
        return Vec::new();
    }

    for (index, document) in corpus.iter().enumerate() {
        for text in [document.title, document.content] {
            let opaque = Entities::scan(text).opaque_spans();
            for word in Words::new(text, &opaque) {
                if let Some(term) = normalize_term(word, &mut buf)
                    && let Some(entry) = stats.get_mut(term)
                    && entry.last_document != Some(index)
                {
                    entry.document_frequency += 1;
                    entry.last_document = Some(index);
                }
            }
        }
    }

    let documents = corpus.len() as f64;
    let prefer_repeated = stats.len() > SINGLETON_THRESHOLD;
    let mut ranked: Vec<Keyword> = stats
        .into_iter()
        .map(|(term, entry)| {
            let idf = ((1.0 + documents) / (1.0 + entry.document_frequency as f64)).ln() + 1.0;
            let score = (entry.count as f64 * idf * 10_000.0).round() / 10_000.0;
            Keyword {
                term,
                count: entry.count,
                score,
            }
        })
        .collect();
    ranked.sort_by(rank);
    if prefer_repeated {
        let (mut chosen, singletons): (Vec<Keyword>, Vec<Keyword>) =
            ranked.into_iter().partition(|keyword| keyword.count > 1);
        chosen.truncate(MAX_KEYWORDS);
        let room = MAX_KEYWORDS - chosen.len();
        chosen.extend(singletons.into_iter().take(room));
        chosen.sort_by(rank);
        chosen
    } else {
        ranked.truncate(MAX_KEYWORDS);
        ranked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc<'a>(title: &'a str, content: &'a str) -> Document<'a> {
        Document { title, content }
    }

    fn analyze(content: &str) -> TextAnalysis {
        analyze_text(doc("", content), &[])
    }

    fn sentences(content: &str) -> usize {
        analyze(content).sentence_count
    }

    fn terms(analysis: &TextAnalysis) -> Vec<&str> {
        analysis
            .top_keywords
            .iter()
            .map(|k| k.term.as_str())
            .collect()
    }

    #[test]
    fn word_lists_are_sorted_for_binary_search() {
        for list in [STOPWORDS, ABBREVIATIONS_BEFORE, ABBREVIATIONS_ANYWHERE] {
            assert!(list.windows(2).all(|w| w[0] < w[1]), "{list:?}");
        }
        assert!(STOPWORDS.len() >= 150);
    }

    #[test]
    fn counts_a_known_paragraph() {
        // Words: Our team met on Monday (5); We reviewed the well-known budget didn't we (7);
        // Yes (1); Next steps hire two engineers (5) = 18.
        // Sentences: "...Monday." "...we?" "Yes!" and the unterminated last line = 4.
        // Characters: 23 + 1 + 45 + 1 + 4 + 2 + 30 = 106.
        let content = "Our team met on Monday. We reviewed the well-known budget, didn't we? Yes!\n\nNext steps: hire two engineers";
        let analysis = analyze(content);
        assert_eq!(analysis.word_count, 18);
        assert_eq!(analysis.sentence_count, 4);
        assert_eq!(analysis.character_count, 106);
        // 18 words at 200 a minute: 5.4 s, rounded up.
        assert_eq!(analysis.reading_time_seconds, 6);
        assert_eq!(analysis.analyzer, "text");
        assert_eq!(analysis.version, 1);
    }

    #[test]
    fn counts_are_of_the_content_only() {
        let analysis = analyze_text(doc("A long title. With sentences.", "Two words"), &[]);
        assert_eq!(analysis.word_count, 2);
        assert_eq!(analysis.sentence_count, 1);
        assert_eq!(analysis.character_count, 9);
        assert_eq!(analysis.reading_time_seconds, 1);
    }

    #[test]
    fn characters_are_unicode_scalars() {
        // n a ï v e, space, c a f é, space, party popper = 12 scalars (17 bytes).
        let analysis = analyze("naïve café 🎉");
        assert_eq!(analysis.character_count, 12);
        assert_eq!(analysis.word_count, 2);
        assert_eq!(analysis.sentence_count, 1);
    }

    #[test]
    fn words_join_inner_punctuation_and_count_entities_once() {
        assert_eq!(
            analyze("don't well-known snake_case it’s 3.5 1,000").word_count,
            6
        );
        assert_eq!(analyze("a--b 'quoted' -dash- end.").word_count, 5);
        // The URL, the email and the mention are one word each; the tag's word is one word.
        let text =
            "see https://example.com/a-b/c_d?x=1 or mail ops.team@example.com @jane_doe #q3-plan";
        assert_eq!(analyze(text).word_count, 7);
    }

    #[test]
    fn words_keep_combining_marks() {
        // A virama (U+094D) and a combining acute accent stay inside their words.
        assert_eq!(analyze("नमस्ते दुनिया").word_count, 2);
        assert_eq!(analyze("cafe\u{301} au lait").word_count, 3);
        assert_eq!(terms(&analyze("cafe\u{301}")), ["cafe\u{301}"]);
    }

    #[test]
    fn sentences_end_at_terminators_followed_by_space() {
        assert_eq!(sentences("One. Two! Three? Four"), 4);
        assert_eq!(sentences("Really?! Yes... okay."), 3);
        assert_eq!(sentences("He said \"stop.\" Then he left."), 2);
        assert_eq!(sentences("(Quietly.) Done."), 2);
    }

    #[test]
    fn sentences_skip_abbreviations() {
        assert_eq!(sentences("Dr. Smith met Mr. Jones. They talked."), 2);
        assert_eq!(
            sentences("Bring fruit, e.g. apples, i.e. red ones. Done."),
            2
        );
        assert_eq!(sentences("Pens, paper, etc. and more. Then we left."), 2);
        // "etc." before a capitalised word does end the sentence.
        assert_eq!(sentences("We bought pens, paper, etc. Then we left."), 2);
        assert_eq!(sentences("Pens, paper, etc."), 1);
    }

    #[test]
    fn sentences_skip_decimals_urls_and_emails() {
        assert_eq!(sentences("The rate rose to 3.5 percent. Good."), 2);
        assert_eq!(
            sentences("See https://example.com/a.b.c for details. Thanks."),
            2
        );
        assert_eq!(sentences("Visit https://example.com. Then rest."), 2);
        assert_eq!(sentences("Mail bob.smith@example.co.uk today. Thanks"), 2);
        assert_eq!(sentences("Version v1.2.3 shipped"), 1);
    }

    #[test]
    fn sentences_end_at_line_breaks_and_paragraphs() {
        let notes = "Agenda:\n- budget\n- hiring\n\nNext steps are clear.\nAnother line";
        assert_eq!(sentences(notes), 5);
        assert_eq!(sentences("First paragraph\n\n\n\nSecond paragraph"), 2);
        assert_eq!(sentences("Ends with a dot.\n\nAnd again.\n"), 2);
        assert_eq!(sentences("Windows\r\nline\r\nbreaks"), 3);
        assert_eq!(sentences("- \n* \n---\n"), 0);
    }

    #[test]
    fn sentences_without_terminators_or_words() {
        assert_eq!(sentences("words but no terminator"), 1);
        assert_eq!(sentences(""), 0);
        assert_eq!(sentences(" \n\t \n "), 0);
        assert_eq!(sentences("... !!! ???"), 0);
        assert_eq!(sentences("🎉🔥"), 0);
    }

    #[test]
    fn sentences_in_other_scripts() {
        assert_eq!(sentences("مرحبا بالعالم. كيف حالك؟"), 2);
        assert_eq!(sentences("שלום עולם. מה שלומך?"), 2);
        assert_eq!(sentences("今日は晴れです。明日は雨です。"), 2);
    }

    #[test]
    fn extracts_urls_with_trailing_punctuation_trimmed() {
        let text = "See https://example.com/a?b=1&c=2. Also (https://en.wikipedia.org/wiki/Rust_(programming_language)), \
                    [link](https://x.org/path). Quote \"https://q.example/x\"! Last https://end.example/path?; \
                    <http://angle.example/> http:// and https://? and https://. HTTPS://Upper.Example/Path \
                    https://example.com/a?b=1&c=2 again, xhttps://glued.example";
        assert_eq!(
            analyze(text).urls,
            [
                "https://example.com/a?b=1&c=2",
                "https://en.wikipedia.org/wiki/Rust_(programming_language)",
                "https://x.org/path",
                "https://q.example/x",
                "https://end.example/path",
                "http://angle.example/",
                "HTTPS://Upper.Example/Path",
            ]
        );
    }

    #[test]
    fn extracts_emails() {
        let text = "Write to Alice.Smith@Example.org or alice.smith@example.org, \
                    (bob+ops@mail.example.co.uk). Not: a@b, foo@bar.c, x@.com, @nobody.com, \
                    https://user@host.example/x. But mailto:carol@example.net. and ..dots@example.com";
        assert_eq!(
            analyze(text).emails,
            [
                "Alice.Smith@Example.org",
                "bob+ops@mail.example.co.uk",
                "carol@example.net",
                "dots@example.com"
            ]
        );
    }

    #[test]
    fn extracts_mentions_but_not_from_emails_or_urls() {
        let text = "Ping @Alice and @bob_smith, email alice@example.com or @dana@example.org, \
                    @alice again, https://medium.com/@writer, lone @ and @@carol, x@erin. \
                    Thanks @Émile!";
        let analysis = analyze(text);
        assert_eq!(analysis.mentions, ["alice", "bob_smith", "carol", "émile"]);
        assert_eq!(analysis.emails, ["alice@example.com", "dana@example.org"]);
        let too_long = format!("@{}", "a".repeat(65));
        assert!(analyze(&too_long).mentions.is_empty());
        let longest = format!("@{}", "a".repeat(64));
        assert_eq!(analyze(&longest).mentions, ["a".repeat(64)]);
    }

    #[test]
    fn extracts_tags_but_not_from_urls() {
        let text = "# Heading\nPlanning #Q3-Planning and #budget, (#Budget) again. Issue #42, C#, \
                    https://x.com/page#section, &#x27; #-bad #ok- #snake_case ##double";
        assert_eq!(
            analyze(text).tags,
            ["q3-planning", "budget", "ok", "snake_case", "double"]
        );
    }

    #[test]
    fn entity_lists_keep_first_appearance_from_title_then_content_and_cap_at_100() {
        let analysis = analyze_text(doc("#Zeta @Zed", "#alpha #zeta @amy @zed"), &[]);
        assert_eq!(analysis.tags, ["zeta", "alpha"]);
        assert_eq!(analysis.mentions, ["zed", "amy"]);

        let many: String = (0..150).map(|i| format!("#tag{i} @user{i} ")).collect();
        let analysis = analyze(&many);
        assert_eq!(analysis.tags.len(), 100);
        assert_eq!(analysis.mentions.len(), 100);
        assert_eq!(analysis.tags[0], "tag0");
        assert_eq!(analysis.tags[99], "tag99");
    }

    #[test]
    fn keywords_rank_by_tf_idf_then_count_then_term() {
        // No corpus: idf is 1 for every term, so the score is the count.
        let analysis =
            analyze("Budget review. The budget for hiring is tight; hiring budget approved.");
        let ranked: Vec<(&str, usize, f64)> = analysis
            .top_keywords
            .iter()
            .map(|k| (k.term.as_str(), k.count, k.score))
            .collect();
        assert_eq!(
            ranked,
            [
                ("budget", 3, 3.0),
                ("hiring", 2, 2.0),
                ("approved", 1, 1.0),
                ("review", 1, 1.0),
                ("tight", 1, 1.0)
            ]
        );
    }

    #[test]
    fn keywords_change_with_the_corpus() {
        let episode = doc("", "Budget budget kubernetes kubernetes.");
        assert_eq!(terms(&analyze_text(episode, &[])), ["budget", "kubernetes"]);

        let corpus = [
            doc("Budget", "Q1 numbers"),
            doc("Notes", "the budget again"),
            doc("Plan", "BUDGET's owner"),
        ];
        let analysis = analyze_text(episode, &corpus);
        // kubernetes: 2 * (ln(4 / 1) + 1) = 4.7726; budget: 2 * (ln(4 / 4) + 1) = 2.
        assert_eq!(terms(&analysis), ["kubernetes", "budget"]);
        assert_eq!(analysis.top_keywords[0].score, 4.7726);
        assert_eq!(analysis.top_keywords[1].score, 2.0);

        // A term in one of three documents: 1 * (ln(4 / 2) + 1) = 1.6931.
        let analysis = analyze_text(doc("", "numbers"), &corpus);
        assert_eq!(analysis.top_keywords[0].score, 1.6931);
    }

    #[test]
    fn keywords_exclude_stopwords_short_words_numbers_and_entities() {
        let analysis = analyze("The and with about would should. It is 2024, 3.5 or 1,000 ox.");
        assert!(
            analysis.top_keywords.is_empty(),
            "{:?}",
            analysis.top_keywords
        );

        let text = "Ask @projectlead at lead@corpmail.example or https://docs.example/kubernetes \
                    about the #roadmap; roadmap and covid19 too.";
        let analysis = analyze(text);
        assert_eq!(terms(&analysis), ["roadmap", "ask", "covid19"]);
    }

    #[test]
    fn keywords_are_at_most_64_characters() {
        let longest = "k".repeat(64);
        let analysis = analyze(&format!("{longest} {}", "z".repeat(65)));
        assert_eq!(terms(&analysis), [longest.as_str()]);
    }

    #[test]
    fn keywords_merge_case_possessives_and_curly_apostrophes() {
        let analysis = analyze("Team team TEAM's team’s");
        assert_eq!(analysis.top_keywords.len(), 1);
        assert_eq!(analysis.top_keywords[0].term, "team");
        assert_eq!(analysis.top_keywords[0].count, 4);
    }

    #[test]
    fn keywords_include_the_title() {
        let analysis = analyze_text(doc("Quarterly forecast", "forecast"), &[]);
        assert_eq!(terms(&analysis), ["forecast", "quarterly"]);
        assert_eq!(analysis.top_keywords[0].count, 2);
    }

    #[test]
    fn keywords_prefer_repeated_terms_in_long_episodes() {
        // 60 distinct terms seen once, and two repeated ones that the corpus makes common.
        let mut text: String = (0..60).map(|i| format!("unique{i} ")).collect();
        text.push_str("common common shared shared");
        let corpus = [doc("", "common shared"), doc("", "common shared")];
        let analysis = analyze_text(doc("", &text), &corpus);
        // Singletons score 1 * (ln(3) + 1) = 2.0986, above the repeated terms' 2 * 1 = 2, but
        // only fill the 8 places left.
        assert_eq!(analysis.top_keywords.len(), 10);
        assert_eq!(
            analysis
                .top_keywords
                .iter()
                .filter(|k| k.count == 2)
                .count(),
            2
        );
        assert!(
            analysis
                .top_keywords
                .windows(2)
                .all(|w| rank(&w[0], &w[1]).is_lt())
        );

        // With 50 distinct terms or fewer, singletons compete on score alone.
        let short = "alpha beta gamma delta epsilon common common";
        let analysis = analyze_text(doc("", short), &[doc("", "common"); 3]);
        assert_eq!(
            analysis.top_keywords.last().map(|k| k.term.as_str()),
            Some("common")
        );
    }

    #[test]
    fn is_deterministic_and_independent_of_corpus_order() {
        let content = "Budget #plan with @ann: https://x.example/a. Hiring, hiring, budget! \
                       Ops ops ops at ops@example.com.";
        let corpus = [
            doc("Ops", "ops hiring"),
            doc("Plan", "budget review"),
            doc("", "misc"),
        ];
        let reversed = [corpus[2], corpus[1], corpus[0]];
        let first = serde_json::to_string(&analyze_text(doc("Weekly", content), &corpus));
        let second = serde_json::to_string(&analyze_text(doc("Weekly", content), &corpus));
        let third = serde_json::to_string(&analyze_text(doc("Weekly", content), &reversed));
        assert!(first.is_ok());
        assert_eq!(first.as_ref().ok(), second.as_ref().ok());
        assert_eq!(first.as_ref().ok(), third.as_ref().ok());
    }

    #[test]
    fn serialises_in_the_documented_shape() {
        let analysis = analyze_text(doc("Title", "Hello world. #tag"), &[]);
        let json = serde_json::to_string(&analysis).unwrap();
        assert_eq!(
            json,
            r#"{"analyzer":"text","version":1,"word_count":3,"sentence_count":2,"character_count":17,"reading_time_seconds":1,"top_keywords":[{"term":"hello","count":1,"score":1.0},{"term":"tag","count":1,"score":1.0},{"term":"title","count":1,"score":1.0},{"term":"world","count":1,"score":1.0}],"urls":[],"emails":[],"mentions":[],"tags":["tag"]}"#
        );
    }

    #[test]
    fn empty_and_blank_content() {
        for content in ["", "   ", "\n\n\t  \r\n"] {
            let analysis = analyze(content);
            assert_eq!(analysis.word_count, 0);
            assert_eq!(analysis.sentence_count, 0);
            assert_eq!(analysis.reading_time_seconds, 0);
            assert!(analysis.top_keywords.is_empty());
            assert!(analysis.urls.is_empty() && analysis.emails.is_empty());
            assert!(analysis.mentions.is_empty() && analysis.tags.is_empty());
        }
        assert_eq!(analyze("   ").character_count, 3);
    }

    #[test]
    fn survives_odd_input() {
        let odd = [
            "@",
            "#",
            "@#",
            "#@",
            "http://",
            "https://",
            "HTTP://",
            "http://.",
            "https://()",
            "mailto:@",
            "a@",
            "@a",
            "a@b.",
            ".@.",
            "🎉",
            "👩‍👩‍👧",
            "e\u{301}",
            "\u{202E}abc",
            "x.",
            "...",
            "etc.",
            "e.g.",
            "((((https://a.b",
            "https://a.b))))",
            "#-",
            "#_",
            "&#",
            "&#x",
            "\u{0}",
            "ab\u{2028}cd",
        ];
        for text in odd {
            let analysis = analyze_text(doc(text, text), &[doc(text, text)]);
            assert_eq!(analysis.character_count, text.chars().count());
        }
        // Every prefix and suffix of a dense mix of entities, at each char boundary.
        let mix = "é @a#b https://x.y/(z)@c.d e@f.gh #ij-. Mr. 3.5!?\n- k 🎉 l'm";
        for (i, _) in mix.char_indices() {
            analyze_text(doc(&mix[i..], &mix[..i]), &[doc(&mix[..i], &mix[i..])]);
        }
    }

    #[test]
    fn handles_very_long_input() {
        let one_word = "a".repeat(100_000);
        let analysis = analyze(&one_word);
        assert_eq!(analysis.word_count, 1);
        assert_eq!(analysis.sentence_count, 1);
        assert_eq!(analysis.character_count, 100_000);
        assert!(
            analysis.top_keywords.is_empty(),
            "a 100,000-letter word is not a keyword"
        );

        let words = "word ".repeat(20_000);
        let analysis = analyze_text(doc("", &words), &[doc("", &words); 20]);
        assert_eq!(analysis.word_count, 20_000);
        // 20,000 words at 200 a minute: 100 minutes.
        assert_eq!(analysis.reading_time_seconds, 6_000);
        assert_eq!(analysis.top_keywords[0].count, 20_000);

        for unit in [
            "@",
            "#",
            ".",
            "http://",
            "https://a.b)",
            "a@",
            "@a.b ",
            "x.y@z",
        ] {
            let text = unit.repeat(100_000 / unit.len());
            analyze_text(doc(&text, &text), &[doc(&text, &text)]);
        }
        let long_local = format!("{}@example.com", "a".repeat(100_000));
        assert!(analyze(&long_local).emails.is_empty());
    }

    #[test]
    fn text_analyzer_returns_an_object_naming_itself() {
        let analyzer: std::sync::Arc<dyn Analyzer> = std::sync::Arc::new(TextAnalyzer);
        assert_eq!(analyzer.name(), "text");
        let corpus = [doc("Other", "another episode")];
        let value =
            futures::executor::block_on(analyzer.analyze(doc("Title", "Some content."), &corpus))
                .unwrap();
        assert_eq!(value["analyzer"], "text");
        assert_eq!(value["version"], 1);
        assert_eq!(value["word_count"], 2);
        assert!(value.is_object());
    }

    #[test]
    fn analysis_errors_say_whether_to_retry() {
        let error = AnalysisError::retryable("model timed out");
        assert!(error.retryable);
        assert_eq!(error.to_string(), "model timed out");
        assert!(!AnalysisError::permanent("bad input").retryable);
    }
}
