//! Request heads in, response heads out.
//!
//! Parsing is httparse over the connection's read buffer; header values and the target
//! are slices of that buffer (no copy). Framing follows RFC 9112 §6.3, stricter where
//! leniency is a smuggling vector: both `Content-Length` and `Transfer-Encoding`, a
//! transfer coding other than `chunked`, or disagreeing lengths are refused.

use std::mem::MaybeUninit;

use bytes::BytesMut;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode, Uri, Version};

/// Why a request head is refused. Each is answered, then the connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("both Content-Length and Transfer-Encoding")]
    Conflict,
    #[error("request head larger than the limit")]
    TooLarge,
    #[error("too many request headers")]
    TooManyHeaders,
}

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// What the connection needs to know about a request besides the request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub framing: Framing,
    /// The client wants the connection kept open after this exchange.
    pub keep_alive: bool,
    /// `Expect: 100-continue`: the client waits for a go-ahead before the body.
    pub expect_continue: bool,
    /// An `Upgrade` request (or CONNECT): on 101 the connection becomes a tunnel.
    pub upgrade: bool,
    /// `TE: trailers`: the client accepts trailers on a chunked response.
    pub trailers: bool,
}

pub struct Parsed {
    pub parts: http::request::Parts,
    pub meta: Meta,
}

/// Parses one request head from the start of `buf`. `Ok(None)`: not complete yet. On
/// success the head's bytes are split off `buf`.
pub fn parse_request(
    buf: &mut BytesMut,
    max_head: usize,
    max_headers: usize,
) -> Result<Option<Parsed>, Refusal> {
    // Raw headers borrow `buf`; their spans are kept so that, once the head is split off
    // and frozen, values become slices of it. Neither array is initialised per request.
    const MAX: usize = 128;
    let mut raw = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut raw[..max_headers.min(MAX)]) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > max_head => return Err(Refusal::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::TooManyHeaders),
        Err(_) => return Err(Refusal::Malformed("invalid request head")),
    };
    if len > max_head {
        return Err(Refusal::TooLarge);
    }
    let base = buf.as_ptr() as usize;
    let method = Method::from_bytes(req.method.unwrap_or_default().as_bytes())
        .map_err(|_| Refusal::Malformed("invalid method"))?;
    let version = match req.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    let path = req.path.unwrap_or_default().as_bytes();
    let path = (path.as_ptr() as usize - base, path.len());

    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut close_token = false;
    let mut keep_alive_token = false;
    let mut upgrade_token = false;
    let mut has_upgrade = false;
    let mut expect_continue = false;
    let mut trailers = false;
    let mut host = false;
    let mut spans = Spans::new();
    for h in req.headers.iter() {
        let (name, value) = (h.name.as_bytes(), h.value);
        let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
        // Hop-by-hop headers that say only what `Meta` already holds are not put in
        // the header map: the proxy would strip them again on the way out.
        let mut spent = false;
        if is("content-length") {
            let n = parse_length(value).ok_or(Refusal::Malformed("invalid Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(Refusal::Malformed("conflicting Content-Length values"));
            }
            length = Some(n);
        } else if is("transfer-encoding") {
            // Only `chunked`, once, as the last coding is understood.
            let mut any = false;
            for coding in tokens(value) {
                if chunked || !coding.eq_ignore_ascii_case(b"chunked") {
                    return Err(Refusal::Malformed("unsupported Transfer-Encoding"));
                }
                chunked = true;
                any = true;
            }
            if !any {
                return Err(Refusal::Malformed("unsupported Transfer-Encoding"));
            }
        } else if is("connection") {
            let c = connection(value);
            close_token |= c.close;
            keep_alive_token |= c.keep_alive;
            upgrade_token |= c.upgrade;
            spent = !c.other;
        } else if is("keep-alive") {
            spent = true;
        } else if is("expect") {
            expect_continue |=
                value.eq_ignore_ascii_case(b"100-continue") && version == Version::HTTP_11;
        } else if is("upgrade") {
            has_upgrade = true;
        } else if is("te") {
            trailers |= tokens(value).any(|t| t.eq_ignore_ascii_case(b"trailers"));
        } else if is("host") {
            // RFC 9112 section 3.2: one Host, or 400 (two could route one way here and
            // another way upstream).
            if host {
                return Err(Refusal::Malformed("more than one Host header"));
            }
            host = true;
        }
        if !spent {
            spans.push(span_of(base, name, value));
        }
    }
    let framing = if chunked {
        if length.is_some() {
            return Err(Refusal::Conflict);
        }
        if version == Version::HTTP_10 {
            return Err(Refusal::Malformed(
                "Transfer-Encoding in an HTTP/1.0 request",
            ));
        }
        Framing::Chunked
    } else {
        match length {
            None | Some(0) => Framing::None,
            Some(n) => Framing::Length(n),
        }
    };
    // HTTP/1.0 keeps the connection only when asked to.
    let keep_alive = !close_token && (version == Version::HTTP_11 || keep_alive_token);

    let head = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(path.0..path.0 + path.1))
        .map_err(|_| Refusal::Malformed("invalid request target"))?;
    let headers = header_map(&head, &spans).map_err(Refusal::Malformed)?;
    let upgrade = (upgrade_token && has_upgrade) || method == Method::CONNECT;
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    parts.version = version;
    parts.headers = headers;
    Ok(Some(Parsed {
        parts,
        meta: Meta {
            framing,
            keep_alive,
            expect_continue,
            upgrade,
            trailers,
        },
    }))
}

/// Where a header's name and value sit in a head: ((at, len), (at, len)).
type Span = ((u32, u32), (u32, u32));

/// The spans of one head's headers. Inline for the usual few (not initialised: zeroing
/// room for the most allowed cost more than the parse), on the heap past that.
type Spans = smallvec::SmallVec<[Span; 32]>;

/// The span of a header whose name and value borrow a buffer starting at `base`.
fn span_of(base: usize, name: &[u8], value: &[u8]) -> Span {
    let at = |s: &[u8]| (s.as_ptr() as usize - base) as u32;
    (
        (at(name), name.len() as u32),
        (at(value), value.len() as u32),
    )
}

/// What a `Connection` header's tokens say.
struct ConnectionTokens {
    close: bool,
    keep_alive: bool,
    upgrade: bool,
    /// A token other than `close`/`keep-alive` (a header name, or `upgrade`): the header
    /// stays in the map for the layers that act on it.
    other: bool,
}

fn connection(value: &[u8]) -> ConnectionTokens {
    let mut c = ConnectionTokens {
        close: false,
        keep_alive: false,
        upgrade: false,
        other: false,
    };
    for t in tokens(value) {
        if t.eq_ignore_ascii_case(b"close") {
            c.close = true;
        } else if t.eq_ignore_ascii_case(b"keep-alive") {
            c.keep_alive = true;
        } else {
            c.other = true;
            c.upgrade |= t.eq_ignore_ascii_case(b"upgrade");
        }
    }
    c
}

/// The header map of a frozen head; values are slices of it.
fn header_map(head: &bytes::Bytes, spans: &[Span]) -> Result<HeaderMap, &'static str> {
    // A few more than parsed: the proxy adds some of its own on the way.
    let mut headers = super::spare::take_map(spans.len() + 4);
    for &((n_at, n_len), (v_at, v_len)) in spans {
        let (n_at, v_at) = (n_at as usize, v_at as usize);
        let name = HeaderName::from_bytes(&head[n_at..n_at + n_len as usize])
            .map_err(|_| "invalid header name")?;
        headers.append(name, value_of(head.slice(v_at..v_at + v_len as usize)));
    }
    Ok(headers)
}

/// A header value httparse accepted, as a `HeaderValue` without checking its bytes again.
#[allow(unsafe_code)]
fn value_of(bytes: bytes::Bytes) -> HeaderValue {
    // SAFETY: httparse accepts a header value only when each of its bytes is HTAB, SP,
    // VCHAR or obs-text (0x80-0xFF): the bytes a `HeaderValue` may hold. (Checking them
    // again cost ~60 instructions per header; debug builds still check.)
    unsafe { HeaderValue::from_maybe_shared_unchecked(bytes) }
}

/// How an upstream's response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFraming {
    None,
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection (HTTP/1.0 style).
    UntilClose,
}

/// An upstream's response head.
pub struct ParsedResponse {
    pub parts: http::response::Parts,
    /// When set, the response's headers are these lines and `parts.headers` is empty.
    pub raw: Option<RawHeaders>,
    pub framing: ResponseFraming,
    /// The upstream keeps the connection open after this response.
    pub keep_alive: bool,
}

/// Most runs of kept lines a [`RawHeaders`] holds (each dropped line in the middle of the
/// head starts another run).
const MAX_RUNS: usize = 4;

/// Response header lines kept as the upstream sent them, for a response that goes back
/// out as HTTP/1.1: building a `HeaderMap` for them and writing it out again cost ~1,000
/// instructions a hop, for headers the proxy does not look at. Only taken for a head
/// whose lines need nothing from the proxy (see [`parse_response`]); whatever reads or
/// changes response headers turns them into a map first ([`RawHeaders::into_map`]).
#[derive(Debug, Clone)]
pub struct RawHeaders {
    head: bytes::Bytes,
    /// Runs of whole lines (`name: value\r\n` each), as byte ranges of `head` (a head
    /// past 64 KiB is parsed into a map).
    runs: [(u16, u16); MAX_RUNS],
    n_runs: u8,
    /// A `Date` line is among them (the writer adds one otherwise).
    pub has_date: bool,
    /// One line the proxy adds (`name: value\r\n`, static), written after the upstream's.
    /// (A reference to a static slice: one word, where a slice would take two.)
    added: Option<&'static &'static [u8]>,
}

impl RawHeaders {
    /// How many bytes the lines take when written.
    pub fn byte_len(&self) -> usize {
        self.runs().map(|(s, e)| e - s).sum::<usize>() + self.added.map_or(0, |l| l.len())
    }

    /// Adds `line` (`name: value\r\n`, a header the upstream's lines do not have), unless a
    /// line was added already: then the caller sets it in the map instead.
    pub fn try_add_line(&mut self, line: &'static &'static [u8]) -> bool {
        debug_assert!(line.ends_with(b"\r\n") && line.contains(&b':'));
        if self.added.is_some() {
            return false;
        }
        self.added = Some(line);
        true
    }

    fn runs(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.runs[..usize::from(self.n_runs)]
            .iter()
            .map(|&(s, e)| (s as usize, e as usize))
    }

    /// Writes the lines.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        for (s, e) in self.runs() {
            out.extend_from_slice(&self.head[s..e]);
        }
        if let Some(line) = self.added {
            out.extend_from_slice(line);
        }
    }

    /// Appends the lines to `map` (before what it holds: the lines came first).
    pub fn into_map(self, map: &mut HeaderMap) {
        let mut lines = super::spare::take_map(map.len() + 8);
        for (s, e) in self.runs() {
            let mut at = s;
            while at < e {
                let line_end = at + memchr::memchr(b'\n', &self.head[at..e]).unwrap_or(e - at);
                // Checked when the head was parsed: `name:` OWS value CRLF.
                if let Some((name, value)) = split_line(&self.head[at..line_end]) {
                    lines.append(name, value_of(self.head.slice_ref(value)));
                }
                at = line_end + 1;
            }
        }
        if let Some((name, value)) = self.added.and_then(|line| split_line(line))
            && let Ok(value) = HeaderValue::from_bytes(value)
        {
            lines.append(name, value);
        }
        for (name, value) in map.drain() {
            if let Some(name) = name {
                lines.append(name, value);
            }
        }
        super::spare::give_map(std::mem::replace(map, lines));
    }
}

/// A header line (`name: value`, with or without its line end) as its name and its value
/// without surrounding whitespace.
fn split_line(line: &[u8]) -> Option<(HeaderName, &[u8])> {
    let line = line.trim_ascii_end();
    let colon = memchr::memchr(b':', line)?;
    let name = HeaderName::from_bytes(&line[..colon]).ok()?;
    Some((name, line[colon + 1..].trim_ascii()))
}

/// Builds a [`RawHeaders`] while a response head's lines are read, or gives up on one
/// that needs the proxy's attention.
struct RawBuilder {
    runs: [(u16, u16); MAX_RUNS],
    n_runs: usize,
    /// The end of the last kept line, when the previous line was kept too.
    open: Option<u16>,
    has_date: bool,
    ok: bool,
}

impl RawBuilder {
    fn new(ok: bool) -> Self {
        RawBuilder {
            runs: [(0, 0); MAX_RUNS],
            n_runs: 0,
            open: None,
            has_date: false,
            ok,
        }
    }

    /// A line the proxy drops (framing, hop-by-hop): it ends the current run.
    fn drop_line(&mut self) {
        self.open = None;
    }

    /// A line that goes out as sent. `head` is the head's buffer; `name`, `value` are
    /// slices of it.
    fn keep(&mut self, head: &[u8], name: &[u8], value: &[u8]) {
        let base = head.as_ptr() as usize;
        let start = name.as_ptr() as usize - base;
        // An empty value has no reliable position; the line must end right after the
        // value (no trailing whitespace, CRLF), so the run is exactly its lines.
        let end = value.as_ptr() as usize - base + value.len();
        if value.is_empty() || head.get(end..end + 2) != Some(&b"\r\n"[..]) {
            self.ok = false;
            return;
        }
        let (Ok(start), Ok(end)) = (u16::try_from(start), u16::try_from(end + 2)) else {
            self.ok = false;
            return;
        };
        match self.open {
            Some(open) if open == start => self.runs[self.n_runs - 1].1 = end,
            _ if self.n_runs == MAX_RUNS => {
                self.ok = false;
                return;
            }
            _ => {
                self.runs[self.n_runs] = (start, end);
                self.n_runs += 1;
            }
        }
        self.open = Some(end);
        self.has_date |= name.eq_ignore_ascii_case(b"date");
    }

    fn finish(self, head: &bytes::Bytes) -> Option<RawHeaders> {
        self.ok.then(|| RawHeaders {
            head: head.clone(),
            runs: self.runs,
            n_runs: self.n_runs as u8,
            has_date: self.has_date,
            added: None,
        })
    }
}

/// Response headers the proxy itself reads or writes: a head with one of them is parsed
/// into a map. (`tern-attempts` and `tern-error` are set by the proxy.)
fn needs_map(name: &[u8]) -> bool {
    const NAMES: [&[u8]; 7] = [
        b"upgrade",
        b"proxy-connection",
        b"trailer",
        b"retry-after",
        b"grpc-status",
        b"tern-attempts",
        b"tern-error",
    ];
    NAMES.iter().any(|n| name.eq_ignore_ascii_case(n))
}

/// Hop-by-hop response headers the proxy removes (as `headers::strip_hop_by_hop` would).
fn is_dropped(name: &[u8]) -> bool {
    const NAMES: [&[u8]; 3] = [b"transfer-encoding", b"te", b"proxy-authorization"];
    NAMES.iter().any(|n| name.eq_ignore_ascii_case(n))
}

/// Parses one response head from the start of `buf` (an answer to a `HEAD` request when
/// `head_request`); `Ok(None)`: not complete yet. The head is split off `buf`.
pub fn parse_response(
    buf: &mut BytesMut,
    max_head: usize,
    head_request: bool,
) -> Result<Option<ParsedResponse>, &'static str> {
    const MAX: usize = 100;
    let mut raw = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut raw);
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) if len <= max_head => len,
        Ok(httparse::Status::Partial) if buf.len() <= max_head => return Ok(None),
        Ok(_) | Err(httparse::Error::TooManyHeaders) => return Err("response head too large"),
        Err(_) => return Err("malformed response head"),
    };
    let status = StatusCode::from_u16(resp.code.unwrap_or(0)).map_err(|_| "invalid status")?;
    let version = match resp.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    // A response with a body gets its length from the body (exact when the length is
    // known), so `Content-Length` is not kept: the writer declares it again without
    // looking it up, and a length beside `Transfer-Encoding` is dropped (RFC 9112
    // section 6.3). A bodiless response keeps it: it describes a body not sent.
    let has_body = !bodiless(head_request, status);
    let base = buf.as_ptr() as usize;
    let mut spans = Spans::new();
    // Raw lines for a plain response (not a protocol switch, and none of its lines needs
    // the proxy: see `needs_map`).
    let mut lines = RawBuilder::new(status != StatusCode::SWITCHING_PROTOCOLS);
    let (mut length, mut chunked, mut close, mut keep_alive_token) = (None, false, false, false);
    for h in resp.headers.iter() {
        let (name, value) = (h.name.as_bytes(), h.value);
        // As for requests: `Connection: keep-alive`/`close` and `Keep-Alive` are
        // answered here (`keep_alive`) and not passed on.
        let mut spent = false;
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_length(value).ok_or("invalid Content-Length")?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting Content-Length values");
            }
            length = Some(n);
            spent = has_body;
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            chunked = tokens(value)
                .last()
                .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"));
            if !chunked {
                return Err("unsupported Transfer-Encoding");
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            let c = connection(value);
            close |= c.close;
            keep_alive_token |= c.keep_alive;
            spent = !c.other;
            // Other tokens name headers to remove: that is the map's work.
            lines.ok &= spent;
        } else if name.eq_ignore_ascii_case(b"keep-alive") {
            spent = true;
        }
        if !spent {
            spans.push(span_of(base, name, value));
        }
        if !lines.ok {
            // Given up: the head goes into a map.
        } else if spent || is_dropped(name) {
            lines.drop_line();
        } else if needs_map(name) {
            lines.ok = false;
        } else {
            lines.keep(buf, name, value);
        }
    }
    let framing = if !has_body {
        ResponseFraming::None
    } else if chunked {
        ResponseFraming::Chunked
    } else {
        match length {
            Some(0) => ResponseFraming::None,
            Some(n) => ResponseFraming::Length(n),
            None => ResponseFraming::UntilClose,
        }
    };
    let keep_alive = !close
        && (version == Version::HTTP_11 || keep_alive_token)
        && framing != ResponseFraming::UntilClose;
    let head = buf.split_to(len).freeze();
    let raw = lines.finish(&head);
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = status;
    parts.version = Version::HTTP_11;
    if raw.is_none() {
        parts.headers = header_map(&head, &spans)?;
    }
    Ok(Some(ParsedResponse {
        parts,
        raw,
        framing,
        keep_alive,
    }))
}

/// Writes a request head for an upstream. `body_len`: the length of a body sent with it
/// (`None`: no body); a length is declared when the headers do not already.
pub fn encode_request(
    out: &mut Vec<u8>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body_len: Option<usize>,
) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    let target = uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut has_length = false;
    for (name, value) in headers {
        if name == header::EXPECT {
            // The body goes with the head: nothing to wait for.
            continue;
        }
        has_length |= name == header::CONTENT_LENGTH;
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let declare = match body_len {
        Some(n) => Some(n as u64),
        // Servers may refuse a body-carrying method without a length (411).
        None if matches!(*method, Method::POST | Method::PUT | Method::PATCH) => Some(0),
        None => None,
    };
    if let Some(n) = declare.filter(|_| !has_length) {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa(n, &mut [0; 20]));
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A `Content-Length` value: digits, or a list of identical digit strings.
fn parse_length(value: &[u8]) -> Option<u64> {
    let mut found: Option<u64> = None;
    for part in value.split(|&b| b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = part.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
        if found.is_some_and(|f| f != n) {
            return None;
        }
        found = Some(n);
    }
    found
}

/// The comma-separated tokens of a header value, trimmed, empty ones skipped.
pub(crate) fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// Whether a response with `status` (to a `HEAD` request when `head_request`) carries no
/// body whatever its headers say.
pub fn bodiless(head_request: bool, status: StatusCode) -> bool {
    head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
}

/// Writes a response head: `raw` lines (an upstream's, as sent), then `headers`.
/// `framing` is what the body will use: a chunked body gets `transfer-encoding: chunked`,
/// a known length its `content-length` when the headers lack it. `close` adds
/// `connection: close`; `keep_alive_10` adds `connection: keep-alive` (for an HTTP/1.0
/// client).
#[expect(
    clippy::too_many_arguments,
    reason = "the head's parts and the connection's framing decisions, each a plain value"
)]
pub fn encode_response(
    out: &mut Vec<u8>,
    status: StatusCode,
    raw: Option<&RawHeaders>,
    headers: &HeaderMap,
    framing: Framing,
    add_length: bool,
    close: bool,
    keep_alive_10: bool,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut has_date = false;
    if let Some(raw) = raw {
        // Never a `Connection` line among them (answered when parsed).
        raw.write_to(out);
        has_date = raw.has_date;
    }
    for (name, value) in headers {
        if name == header::DATE {
            has_date = true;
        } else if close && name == header::CONNECTION {
            // Replaced by `connection: close` below.
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::Length(n) if add_length => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa(n, &mut [0; 20]));
            out.extend_from_slice(b"\r\n");
        }
        _ => {}
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    } else if keep_alive_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    if !has_date {
        out.extend_from_slice(b"date: ");
        super::date::with_now(|d| out.extend_from_slice(d));
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes trailer fields (or nothing), then the blank line ending a chunked body.
pub fn encode_trailers(out: &mut Vec<u8>, trailers: Option<&HeaderMap>) {
    for (name, value) in trailers.into_iter().flatten() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Decimal digits of `n`, without allocating.
pub fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// The `Content-Length` a response declares, if valid.
pub fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| parse_length(v.as_bytes()))
}

#[cfg(test)]
fn parse(s: &str) -> Result<Option<Parsed>, Refusal> {
    let mut b = BytesMut::from(s.as_bytes());
    parse_request(&mut b, 64 * 1024, 100)
}

#[cfg(test)]
mod tests {
    impl ParsedResponse {
        /// Every header of the response, raw lines included.
        fn all_headers(&self) -> HeaderMap {
            let mut h = self.parts.headers.clone();
            if let Some(raw) = self.raw.clone() {
                raw.into_map(&mut h);
            }
            h
        }
    }

    fn response(s: &str) -> ParsedResponse {
        parse_response(&mut BytesMut::from(s.as_bytes()), 4096, false)
            .unwrap()
            .unwrap()
    }

    fn written(r: &ParsedResponse) -> String {
        let mut out = Vec::new();
        let framing = match r.framing {
            ResponseFraming::Length(n) => Framing::Length(n),
            ResponseFraming::Chunked => Framing::Chunked,
            _ => Framing::None,
        };
        let (raw, map) = (r.raw.as_ref(), &r.parts.headers);
        encode_response(
            &mut out,
            r.parts.status,
            raw,
            map,
            framing,
            true,
            false,
            false,
        );
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn plain_response_lines_go_back_out_as_sent() {
        let r = response(
            "HTTP/1.1 200 OK\r\nServer: up\r\nDate: Tue, 24 Nov 2026 15:00:00 GMT\r\n\
             Content-Type: text/plain\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\
             Keep-Alive: timeout=5\r\nX-Trace:a b\r\nTransfer-Encoding: chunked\r\n\
             X-Last: 1\r\n\r\n",
        );
        let raw = r.raw.as_ref().expect("raw lines");
        assert!(r.parts.headers.is_empty() && raw.has_date);
        // Three runs: the dropped lines (length, connection, keep-alive, transfer-encoding)
        // are left out; names keep their case, values their spacing; no second date.
        assert_eq!(
            written(&r),
            "HTTP/1.1 200 OK\r\nServer: up\r\nDate: Tue, 24 Nov 2026 15:00:00 GMT\r\n\
             Content-Type: text/plain\r\nX-Trace:a b\r\nX-Last: 1\r\n\
             transfer-encoding: chunked\r\n\r\n"
        );
        // As a map: the same headers, in order, values trimmed.
        let h = r.all_headers();
        let names: Vec<&str> = h.keys().map(|n| n.as_str()).collect();
        assert_eq!(
            names,
            ["server", "date", "content-type", "x-trace", "x-last"]
        );
        assert_eq!(h["x-trace"], "a b");
        assert_eq!(r.framing, ResponseFraming::Chunked);
        // Without a date line the writer adds one.
        let r = response("HTTP/1.1 204 No Content\r\nX: 1\r\n\r\n");
        assert!(r.raw.is_some() && written(&r).contains("\r\nX: 1\r\ndate: "));
    }

    #[test]
    fn heads_the_proxy_must_read_are_parsed_into_a_map() {
        for head in [
            // Connection naming another header, a protocol switch, headers the proxy
            // reads or sets itself.
            "HTTP/1.1 200 OK\r\nConnection: X-Hop\r\nX-Hop: 1\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
            "HTTP/1.1 200 OK\r\nUpgrade: h2c\r\n\r\n",
            "HTTP/1.1 503 Busy\r\nRetry-After: 1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nGrpc-Status: 14\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntern-attempts: 9\r\n\r\n",
            "HTTP/1.1 502 Bad Gateway\r\nTern-Error: x\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTrailer: x\r\n\r\n",
            // Lines not exactly `name: value CRLF`.
            "HTTP/1.1 200 OK\r\nX: 1 \r\n\r\n",
            "HTTP/1.1 200 OK\r\nX:\r\n\r\n",
            "HTTP/1.1 200 OK\nX: 1\nY: 2\n\n",
            // More than four runs.
            "HTTP/1.1 200 OK\r\nA: 1\r\nKeep-Alive: 1\r\nB: 1\r\nKeep-Alive: 1\r\nC: 1\r\n\
             Keep-Alive: 1\r\nD: 1\r\nKeep-Alive: 1\r\nE: 1\r\n\r\n",
        ] {
            let Ok(Some(r)) = parse_response(&mut BytesMut::from(head.as_bytes()), 4096, false)
            else {
                continue; // refused outright is fine too
            };
            assert!(r.raw.is_none(), "{head:?}");
            assert!(!r.parts.headers.is_empty(), "{head:?}");
        }
        // Lines past 64 KiB into the head.
        let big = format!(
            "HTTP/1.1 200 OK\r\nX-Big: {}\r\nX: 1\r\n\r\n",
            "a".repeat(70_000)
        );
        let r = parse_response(&mut BytesMut::from(big.as_bytes()), 128 * 1024, false)
            .unwrap()
            .unwrap();
        assert!(r.raw.is_none() && r.parts.headers["x"] == "1");
        // Four runs are still lines.
        let r = response(
            "HTTP/1.1 200 OK\r\nA: 1\r\nKeep-Alive: 1\r\nB: 1\r\nKeep-Alive: 1\r\nC: 1\r\n\
             Keep-Alive: 1\r\nD: 1\r\n\r\n",
        );
        assert!(written(&r).starts_with("HTTP/1.1 200 OK\r\nA: 1\r\nB: 1\r\nC: 1\r\nD: 1\r\n"));
    }

    #[test]
    fn a_line_added_to_raw_lines_is_written_once_and_joins_the_map() {
        let mut r = response("HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 0\r\n\r\n");
        let raw = r.raw.as_mut().expect("raw lines");
        let before = raw.byte_len();
        static ADDED: &[u8] = b"tern-attempts: 2\r\n";
        static ANOTHER: &[u8] = b"x-other: 1\r\n";
        assert!(raw.try_add_line(&ADDED));
        // One added line at most: a second goes to the map.
        assert!(!raw.try_add_line(&ANOTHER));
        assert_eq!(raw.byte_len(), before + "tern-attempts: 2\r\n".len());
        let out = written(&r);
        assert!(
            out.starts_with("HTTP/1.1 200 OK\r\nX-A: 1\r\ntern-attempts: 2\r\n"),
            "{out}"
        );
        assert_eq!(out.matches("tern-attempts").count(), 1, "{out}");
        let all = r.all_headers();
        assert_eq!(all["x-a"], "1");
        assert_eq!(all.get_all("tern-attempts").iter().count(), 1);
        assert_eq!(all["tern-attempts"], "2");
    }

    #[test]
    fn raw_lines_join_the_map_before_its_own_entries() {
        let mut r = response("HTTP/1.1 200 OK\r\nX-A: 1\r\nX-B: 2\r\n\r\n");
        r.parts
            .headers
            .insert("x-added", HeaderValue::from_static("3"));
        let raw = r.raw.take().unwrap();
        raw.into_map(&mut r.parts.headers);
        let all: Vec<(&str, &[u8])> = r
            .parts
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes()))
            .collect();
        assert_eq!(
            all,
            [
                ("x-a", &b"1"[..]),
                ("x-b", &b"2"[..]),
                ("x-added", &b"3"[..])
            ]
        );
    }
    use super::*;

    fn ok(s: &str) -> Parsed {
        parse(s).unwrap().unwrap()
    }

    #[test]
    fn parses_a_get_and_splits_it_off() {
        let mut b =
            BytesMut::from(&b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-Y: z\r\n\r\nGET /next"[..]);
        let p = parse_request(&mut b, 1024, 100).unwrap().unwrap();
        assert_eq!(p.parts.method, Method::GET);
        assert_eq!(p.parts.uri, "/a?b=1");
        assert_eq!(p.parts.version, Version::HTTP_11);
        assert_eq!(p.parts.headers["host"], "x");
        assert_eq!(p.parts.headers["x-y"], "z");
        assert_eq!(p.meta.framing, Framing::None);
        assert!(p.meta.keep_alive);
        assert_eq!(&b[..], b"GET /next");
    }

    #[test]
    fn partial_heads_wait_and_oversized_ones_are_refused() {
        assert!(parse("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
        let mut big = BytesMut::from(&b"GET / HTTP/1.1\r\nX: "[..]);
        big.extend_from_slice(&[b'a'; 200]);
        assert_eq!(
            parse_request(&mut big.clone(), 100, 100).err(),
            Some(Refusal::TooLarge)
        );
        big.extend_from_slice(b"\r\n\r\n");
        assert_eq!(
            parse_request(&mut big, 100, 100).err(),
            Some(Refusal::TooLarge)
        );
        let many: String = (0..5).map(|i| format!("h{i}: v\r\n")).collect();
        let mut b = BytesMut::from(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes());
        assert_eq!(
            parse_request(&mut b, 1024, 4).err(),
            Some(Refusal::TooManyHeaders)
        );
    }

    #[test]
    fn framing_follows_rfc_9112_strictly() {
        let p = ok("POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(p.meta.framing, Framing::Length(5));
        let p = ok("POST / HTTP/1.1\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(p.meta.framing, Framing::Length(5));
        let p = ok("POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(p.meta.framing, Framing::None);
        let p = ok("POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n");
        assert_eq!(p.meta.framing, Framing::Chunked);
        for bad in [
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: \r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: \r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(
                matches!(parse(bad), Err(Refusal::Malformed(_))),
                "{bad:?} was accepted"
            );
        }
        let both = "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(parse(both).err(), Some(Refusal::Conflict));
    }

    #[test]
    fn keep_alive_expect_upgrade_and_te() {
        assert!(
            !ok("GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
                .meta
                .keep_alive
        );
        assert!(!ok("GET / HTTP/1.0\r\n\r\n").meta.keep_alive);
        assert!(
            ok("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
                .meta
                .keep_alive
        );
        assert!(
            !ok("GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n")
                .meta
                .keep_alive
        );
        let p = ok("PUT / HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 3\r\n\r\n");
        assert!(p.meta.expect_continue);
        assert!(
            !ok("PUT / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n")
                .meta
                .expect_continue
        );
        let p = ok("GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n");
        assert!(p.meta.upgrade);
        assert!(
            !ok("GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n")
                .meta
                .upgrade
        );
        assert!(ok("GET / HTTP/1.1\r\nTE: trailers\r\n\r\n").meta.trailers);
    }

    #[test]
    fn connection_headers_that_only_frame_stay_out_of_the_map() {
        let p = ok(
            "GET / HTTP/1.0\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nX-A: 1\r\n\r\n",
        );
        assert!(p.meta.keep_alive);
        assert!(!p.parts.headers.contains_key("connection"));
        assert!(!p.parts.headers.contains_key("keep-alive"));
        assert_eq!(p.parts.headers["x-a"], "1");
        // Tokens the layers act on (an upgrade, a header to strip) keep the header.
        let p = ok("GET / HTTP/1.1\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\n\r\n");
        assert_eq!(p.parts.headers["connection"], "keep-alive, X-Secret");
        let p = ok("GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n");
        assert_eq!(p.parts.headers["connection"], "Upgrade");

        let mut b = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"[..],
        );
        let r = parse_response(&mut b, 1024, false).unwrap().unwrap();
        assert!(!r.keep_alive);
        assert!(!r.all_headers().contains_key("connection"));
        assert!(r.all_headers().is_empty());
        let mut b = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n\r\n"[..],
        );
        let r = parse_response(&mut b, 1024, false).unwrap().unwrap();
        assert_eq!(r.all_headers()["connection"], "keep-alive, X-Hop");
    }

    #[test]
    fn a_response_length_is_the_bodys_unless_there_is_no_body() {
        let parse = |s: &str, head_request| {
            let mut b = BytesMut::from(s.as_bytes());
            parse_response(&mut b, 1024, head_request).unwrap().unwrap()
        };
        // The body carries it (the writer declares it again from the body's size).
        let r = parse(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX: 1\r\n\r\n",
            false,
        );
        assert_eq!(r.framing, ResponseFraming::Length(5));
        assert!(!r.all_headers().contains_key("content-length"));
        assert_eq!(r.all_headers()["x"], "1");
        let r = parse("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", false);
        assert_eq!(r.framing, ResponseFraming::None);
        assert!(r.all_headers().is_empty());
        // Beside Transfer-Encoding a length is dropped, not passed on.
        let r = parse(
            "HTTP/1.1 200 OK\r\nContent-Length: 7\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        );
        assert_eq!(r.framing, ResponseFraming::Chunked);
        assert!(!r.all_headers().contains_key("content-length"));
        // No body: the length describes the one not sent, and stays.
        let r = parse("HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", true);
        assert_eq!(r.framing, ResponseFraming::None);
        assert_eq!(r.all_headers()["content-length"], "99");
        let r = parse(
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 12\r\n\r\n",
            false,
        );
        assert_eq!(r.all_headers()["content-length"], "12");
        // Still checked where it is dropped.
        let mut b = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..],
        );
        assert!(parse_response(&mut b, 1024, false).is_err());
    }

    #[test]
    fn heads_with_many_headers_keep_them_all() {
        // Past the inline room for spans (32), in order.
        let mut req = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
        let mut resp = String::from("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n");
        for i in 0..60 {
            req.push_str(&format!("X-{i}: {i}\r\n"));
            resp.push_str(&format!("X-{i}: {i}\r\n"));
        }
        req.push_str("\r\n");
        resp.push_str("\r\n");
        let p = ok(&req);
        assert_eq!(p.parts.headers.len(), 61);
        let mut b = BytesMut::from(resp.as_bytes());
        let r = parse_response(&mut b, 64 * 1024, false).unwrap().unwrap();
        assert_eq!(r.all_headers().len(), 60);
        for i in 0..60 {
            assert_eq!(
                p.parts.headers[format!("x-{i}").as_str()],
                i.to_string().as_str()
            );
            assert_eq!(
                r.all_headers()[format!("x-{i}").as_str()],
                i.to_string().as_str()
            );
        }
    }

    #[test]
    fn a_second_host_is_refused() {
        assert!(matches!(
            parse("GET / HTTP/1.1\r\nHost: a\r\nX: y\r\nhost: b\r\n\r\n"),
            Err(Refusal::Malformed(_))
        ));
        let p = parse("GET / HTTP/1.1\r\nHost: a\r\n\r\n").unwrap().unwrap();
        assert_eq!(p.parts.headers["host"], "a");
    }

    #[test]
    fn garbage_is_malformed() {
        for bad in [
            "GET\r\n\r\n",
            "\x16\x03\x01\x02\x00",
            "GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
        ] {
            assert!(matches!(parse(bad), Err(Refusal::Malformed(_))), "{bad:?}");
        }
    }

    #[test]
    fn response_heads_carry_framing_and_date() {
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("1"));
        h.insert("connection", HeaderValue::from_static("keep-alive"));
        let mut out = Vec::new();
        encode_response(
            &mut out,
            StatusCode::OK,
            None,
            &h,
            Framing::Length(1024),
            true,
            true,
            false,
        );
        let s = String::from_utf8(out).unwrap();
        assert!(
            s.starts_with(
                "HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 1024\r\nconnection: close\r\ndate: "
            ),
            "{s}"
        );
        assert!(s.ends_with(" GMT\r\n\r\n"));
        let mut out = Vec::new();
        h.insert("date", HeaderValue::from_static("then"));
        encode_response(
            &mut out,
            StatusCode::NOT_FOUND,
            None,
            &h,
            Framing::Chunked,
            false,
            false,
            false,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 404 Not Found\r\nx-a: 1\r\nconnection: keep-alive\r\ndate: then\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        assert_eq!(itoa(0, &mut [0; 20]), b"0");
        assert_eq!(itoa(u64::MAX, &mut [0; 20]), b"18446744073709551615");
    }

    #[test]
    fn parses_upstream_responses_and_their_framing() {
        let mut b =
            BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello"[..]);
        let r = parse_response(&mut b, 1024, false).unwrap().unwrap();
        assert_eq!(r.parts.status, StatusCode::OK);
        assert_eq!(r.all_headers()["x-a"], "1");
        assert_eq!(r.framing, ResponseFraming::Length(5));
        assert!(r.keep_alive);
        assert_eq!(&b[..], b"hello");
        let mut b = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"[..]);
        let r = parse_response(&mut b, 1024, true).unwrap().unwrap();
        assert_eq!(r.framing, ResponseFraming::None);
        let mut b = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"[..],
        );
        let r = parse_response(&mut b, 1024, false).unwrap().unwrap();
        assert_eq!(r.framing, ResponseFraming::Chunked);
        assert!(!r.keep_alive);
        let mut b = BytesMut::from(&b"HTTP/1.0 200 OK\r\n\r\nbody"[..]);
        let r = parse_response(&mut b, 1024, false).unwrap().unwrap();
        assert_eq!(r.framing, ResponseFraming::UntilClose);
        assert!(!r.keep_alive);
        let mut b = BytesMut::from(&b"HTTP/1.1 204 No Content\r\n\r\n"[..]);
        assert_eq!(
            parse_response(&mut b, 1024, false)
                .unwrap()
                .unwrap()
                .framing,
            ResponseFraming::None
        );
        assert!(
            parse_response(
                &mut BytesMut::from(&b"HTTP/1.1 200 OK\r\n"[..]),
                1024,
                false
            )
            .unwrap()
            .is_none()
        );
        assert!(
            parse_response(
                &mut BytesMut::from(
                    &b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..]
                ),
                1024,
                false
            )
            .is_err()
        );
        assert!(parse_response(&mut BytesMut::from(&b"garbage\r\n\r\n"[..]), 1024, false).is_err());
    }

    #[test]
    fn encodes_upstream_requests() {
        let mut req = http::Request::post("http://svc/a?b").body(()).unwrap();
        req.headers_mut()
            .insert("host", HeaderValue::from_static("svc"));
        req.headers_mut()
            .insert("expect", HeaderValue::from_static("100-continue"));
        let (parts, ()) = req.into_parts();
        let mut out = Vec::new();
        encode_request(&mut out, &parts.method, &parts.uri, &parts.headers, Some(3));
        assert_eq!(
            out,
            b"POST /a?b HTTP/1.1\r\nhost: svc\r\ncontent-length: 3\r\n\r\n"
        );
        let mut out = Vec::new();
        encode_request(&mut out, &parts.method, &parts.uri, &parts.headers, None);
        assert!(out.ends_with(b"content-length: 0\r\n\r\n"));
        let (parts, ()) = http::Request::get("/").body(()).unwrap().into_parts();
        let mut out = Vec::new();
        encode_request(&mut out, &parts.method, &parts.uri, &parts.headers, None);
        assert_eq!(out, b"GET / HTTP/1.1\r\n\r\n");
    }
}
