//! multipart/related (RFC 2387, with the body syntax of RFC 2046 5.1.1):
//! the one parser and builder for every DICOMweb body the node reads or
//! writes (STOW-RS requests in, WADO-RS responses, STOW-RS requests out;
//! PS3.18 8.6.1.2). Bounded (a limit on parts and on bytes), zero-copy
//! (parts are slices of the body), and total: any input gives parts or a
//! [`MultipartError`], never a panic.
//!
//! Lenient where real peers are: a bare LF is accepted wherever RFC 2046
//! says CRLF (delimiters, header lines, the blank line), transport padding
//! after a delimiter is skipped, and a preamble and epilogue are ignored.

use bytes::Bytes;

/// RFC 2046 5.1.1 says a boundary is 1 to 70 characters; Orthanc 1.10's
/// DICOMweb client sends 73 (two UUIDs), so longer ones are read, up to
/// this. The bodies the node builds keep to 70.
pub const MAX_BOUNDARY_LEN: usize = 200;
/// Header block of one part, in bytes: more is not a DICOMweb part.
const MAX_PART_HEADER_BYTES: usize = 16 * 1024;

/// How much one body may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_parts: usize,
    pub max_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_parts: 10_000,
            max_bytes: 1 << 30,
        }
    }
}

/// Why a body is not a usable multipart/related body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MultipartError {
    #[error("Content-Type is not multipart/related (got {0:?})")]
    NotMultipart(String),
    #[error("Content-Type has no boundary parameter")]
    MissingBoundary,
    #[error("boundary must be 1 to 200 characters without CR or LF")]
    BadBoundary,
    #[error("the body holds no delimiter line for its boundary")]
    NoDelimiter,
    #[error("the body ends before its close delimiter (truncated)")]
    Truncated,
    #[error("part {part}: header block has no end (blank line) or is too long")]
    BadHeaderBlock { part: usize },
    #[error("part {part}: header line {line:?} is not `Name: value`")]
    BadHeader { part: usize, line: String },
    #[error("part {part}: no Content-Type")]
    MissingContentType { part: usize },
    #[error("part {part}: Content-Type is {found:?}, expected {expected}")]
    WrongContentType {
        part: usize,
        found: String,
        expected: String,
    },
    #[error("more than {0} parts")]
    TooManyParts(usize),
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
    #[error("the body holds no part")]
    Empty,
}

/// A media type with its parameters (RFC 9110 8.3.1): type and parameter
/// names lowercased, quoted values unquoted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaType {
    pub essence: String,
    pub params: Vec<(String, String)>,
}

impl MediaType {
    /// Parse `type/subtype; name=value; name="quoted \"value\""`. None when
    /// there is no `type/subtype`.
    pub fn parse(s: &str) -> Option<MediaType> {
        let mut rest = s.trim();
        let end = rest.find(';').unwrap_or(rest.len());
        let essence = rest[..end].trim().to_ascii_lowercase();
        let (t, sub) = essence.split_once('/')?;
        if t.is_empty() || sub.is_empty() || essence.contains(char::is_whitespace) {
            return None;
        }
        rest = &rest[end..];
        let mut params = Vec::new();
        while let Some(r) = rest.strip_prefix(';') {
            let r = r.trim_start();
            let Some(eq) = r.find('=') else {
                // A parameter without a value: skip to the next one.
                rest = r.find(';').map_or("", |i| &r[i..]);
                continue;
            };
            let name = r[..eq].trim().to_ascii_lowercase();
            let after = &r[eq + 1..];
            let (value, tail) = if let Some(q) = after.strip_prefix('"') {
                let mut value = String::new();
                let mut chars = q.char_indices();
                let mut tail = "";
                let mut closed = false;
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some((_, n)) = chars.next() {
                                value.push(n);
                            }
                        }
                        '"' => {
                            tail = &q[i + 1..];
                            closed = true;
                            break;
                        }
                        c => value.push(c),
                    }
                }
                if !closed {
                    tail = "";
                }
                let tail = tail.find(';').map_or("", |i| &tail[i..]);
                (value, tail)
            } else {
                let end = after.find(';').unwrap_or(after.len());
                (after[..end].trim().to_string(), &after[end..])
            };
            if !name.is_empty() {
                params.push((name, value));
            }
            rest = tail;
        }
        Some(MediaType { essence, params })
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The boundary of a `multipart/related` Content-Type, checked.
pub fn boundary_of(content_type: &str) -> Result<String, MultipartError> {
    let mt = MediaType::parse(content_type)
        .ok_or_else(|| MultipartError::NotMultipart(content_type.to_string()))?;
    if mt.essence != "multipart/related" {
        return Err(MultipartError::NotMultipart(mt.essence));
    }
    let b = mt
        .param("boundary")
        .ok_or(MultipartError::MissingBoundary)?;
    check_boundary(b)?;
    Ok(b.to_string())
}

fn check_boundary(b: &str) -> Result<(), MultipartError> {
    if b.is_empty() || b.len() > MAX_BOUNDARY_LEN || b.bytes().any(|c| c == b'\r' || c == b'\n') {
        return Err(MultipartError::BadBoundary);
    }
    Ok(())
}

/// One body part: its headers (names lowercased) and its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Part {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn content_type(&self) -> Option<MediaType> {
        self.header("content-type").and_then(MediaType::parse)
    }
}

/// Find `needle` in `hay` from `from`.
fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() || from > hay.len() {
        return None;
    }
    memchr::memmem::find(&hay[from..], needle).map(|p| p + from)
}

/// The next delimiter line `--boundary` at or after `from` that starts a
/// line (at the body's start or after LF): (start of the line break before
/// it, index just after `--boundary`).
fn next_delimiter(body: &[u8], dash_boundary: &[u8], from: usize) -> Option<(usize, usize)> {
    let mut at = from;
    loop {
        let i = find(body, dash_boundary, at)?;
        if i == 0 {
            return Some((0, dash_boundary.len()));
        }
        if body[i - 1] == b'\n' {
            let brk = if i >= 2 && body[i - 2] == b'\r' {
                i - 2
            } else {
                i - 1
            };
            return Some((brk.max(from), i + dash_boundary.len()));
        }
        at = i + 1;
    }
}

/// Split a multipart body on `boundary`.
pub fn parse(body: &Bytes, boundary: &str, limits: &Limits) -> Result<Vec<Part>, MultipartError> {
    check_boundary(boundary)?;
    if body.len() > limits.max_bytes {
        return Err(MultipartError::TooLarge(limits.max_bytes));
    }
    let dash: Vec<u8> = [b"--".as_slice(), boundary.as_bytes()].concat();
    let (_, mut pos) = next_delimiter(body, &dash, 0).ok_or(MultipartError::NoDelimiter)?;
    let mut parts = Vec::new();
    loop {
        // After a delimiter: `--` closes the body; else transport padding
        // (spaces, tabs) and the line break that starts the part.
        let rest = &body[pos..];
        if rest.starts_with(b"--") {
            break;
        }
        let pad = rest
            .iter()
            .take_while(|&&c| c == b' ' || c == b'\t')
            .count();
        let rest = &rest[pad..];
        let brk = if rest.starts_with(b"\r\n") {
            2
        } else if rest.starts_with(b"\n") {
            1
        } else if rest.is_empty() {
            return Err(MultipartError::Truncated);
        } else {
            // `--boundaryX`: a longer line that merely starts with the
            // boundary is not a delimiter (RFC 2046: the boundary must
            // not appear in the content), so the body is malformed.
            return Err(MultipartError::NoDelimiter);
        };
        let start = pos + pad + brk;
        if parts.len() == limits.max_parts {
            return Err(MultipartError::TooManyParts(limits.max_parts));
        }
        let Some((end, next)) = next_delimiter(body, &dash, start) else {
            return Err(MultipartError::Truncated);
        };
        parts.push(split_part(body.slice(start..end), parts.len() + 1)?);
        pos = next;
    }
    if parts.is_empty() {
        return Err(MultipartError::Empty);
    }
    Ok(parts)
}

/// Headers, a blank line, the content (RFC 2046 5.1.1 body-part; a part
/// with no header lines starts with the blank line).
fn split_part(raw: Bytes, number: usize) -> Result<Part, MultipartError> {
    if raw.is_empty() {
        return Ok(Part {
            headers: Vec::new(),
            body: raw,
        });
    }
    let (head_end, body_start) = if raw.starts_with(b"\r\n") {
        (0, 2)
    } else if raw.starts_with(b"\n") {
        (0, 1)
    } else {
        let limit = raw.len().min(MAX_PART_HEADER_BYTES + 4);
        let window = &raw[..limit];
        let crlf = find(window, b"\r\n\r\n", 0).map(|i| (i, i + 4));
        let lf = find(window, b"\n\n", 0).map(|i| (i, i + 2));
        let mixed = find(window, b"\n\r\n", 0).map(|i| (i, i + 3));
        [crlf, lf, mixed]
            .into_iter()
            .flatten()
            .min_by_key(|(i, _)| *i)
            .ok_or(MultipartError::BadHeaderBlock { part: number })?
    };
    let head = &raw[..head_end];
    let text = std::str::from_utf8(head).map_err(|_| MultipartError::BadHeader {
        part: number,
        line: String::from_utf8_lossy(head).chars().take(80).collect(),
    })?;
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            // RFC 5322 folding: continues the previous header's value.
            match headers.last_mut() {
                Some((_, v)) => {
                    v.push(' ');
                    v.push_str(line.trim());
                    continue;
                }
                None => {
                    return Err(MultipartError::BadHeader {
                        part: number,
                        line: line.chars().take(80).collect(),
                    });
                }
            }
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(MultipartError::BadHeader {
                part: number,
                line: line.chars().take(80).collect(),
            });
        };
        let name = name.trim();
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(MultipartError::BadHeader {
                part: number,
                line: line.chars().take(80).collect(),
            });
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
    Ok(Part {
        headers,
        body: raw.slice(body_start..),
    })
}

/// Check that every part is of `expected` (the essence, e.g.
/// `application/dicom`).
pub fn require_type(parts: &[Part], expected: &str) -> Result<(), MultipartError> {
    for (i, p) in parts.iter().enumerate() {
        match p.content_type() {
            None => return Err(MultipartError::MissingContentType { part: i + 1 }),
            Some(mt) if mt.essence != expected => {
                return Err(MultipartError::WrongContentType {
                    part: i + 1,
                    found: mt.essence,
                    expected: expected.to_string(),
                });
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// A fresh random boundary (RFC 2046 bchars only).
pub fn new_boundary() -> String {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    format!("her2map-{}", hex::encode(b))
}

/// The Content-Type of a body built by [`build`]: `multipart/related;
/// type="TYPE"; boundary=B`.
pub fn content_type(part_type: &str, boundary: &str) -> String {
    format!("multipart/related; type=\"{part_type}\"; boundary={boundary}")
}

/// Build a body: each part with its Content-Type, CRLF line breaks, a
/// close delimiter. The boundary must not occur in any content (use
/// [`new_boundary`]: 128 random bits).
pub fn build<B: AsRef<[u8]>>(parts: &[(&str, B)], boundary: &str) -> Vec<u8> {
    let total: usize = parts.iter().map(|(_, b)| b.as_ref().len() + 128).sum();
    let mut out = Vec::with_capacity(total + boundary.len() + 8);
    for (ct, content) in parts {
        out.extend_from_slice(b"--");
        out.extend_from_slice(boundary.as_bytes());
        out.extend_from_slice(b"\r\nContent-Type: ");
        out.extend_from_slice(ct.as_bytes());
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(content.as_ref());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"--");
    out.extend_from_slice(boundary.as_bytes());
    out.extend_from_slice(b"--\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(body: &[u8], boundary: &str) -> Result<Vec<Part>, MultipartError> {
        parse(&Bytes::copy_from_slice(body), boundary, &Limits::default())
    }

    #[test]
    fn built_bodies_parse_back() {
        let b = new_boundary();
        let body = build(
            &[
                ("application/dicom", b"first\r\n--not".as_slice()),
                ("application/dicom", b"".as_slice()),
            ],
            &b,
        );
        let ct = content_type("application/dicom", &b);
        assert_eq!(boundary_of(&ct).unwrap(), b);
        let parts = p(&body, &b).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(&parts[0].body[..], b"first\r\n--not");
        assert_eq!(parts[1].body.len(), 0);
        assert_eq!(
            parts[0].content_type().unwrap().essence,
            "application/dicom"
        );
        require_type(&parts, "application/dicom").unwrap();
    }

    #[test]
    fn boundaries_with_quotes_and_parameters() {
        let ct = r#"Multipart/Related; type="application/dicom"; boundary="a b;c\"d""#;
        assert_eq!(boundary_of(ct).unwrap(), "a b;c\"d");
        // Orthanc 1.10's boundary: 73 characters, past RFC 2046's 70.
        let orthanc = "029a6982-adf0-4fed-b204-f6bd6de561b7-029a6982-adf0-4fed-b204-f6bd6de561b7";
        let ct = format!("multipart/related; type=\"application/dicom\"; boundary={orthanc}");
        assert_eq!(boundary_of(&ct).unwrap(), orthanc);
        let ct = "multipart/related;boundary=xyz;type=application/dicom";
        assert_eq!(boundary_of(ct).unwrap(), "xyz");
        let mt = MediaType::parse(ct).unwrap();
        assert_eq!(mt.param("TYPE"), Some("application/dicom"));
        assert_eq!(
            boundary_of("multipart/related; type=application/dicom"),
            Err(MultipartError::MissingBoundary)
        );
        assert!(matches!(
            boundary_of("application/dicom; boundary=x"),
            Err(MultipartError::NotMultipart(_))
        ));
        assert_eq!(
            boundary_of(&format!("multipart/related; boundary={}", "x".repeat(201))),
            Err(MultipartError::BadBoundary)
        );
        assert_eq!(
            boundary_of("multipart/related; boundary=\"\""),
            Err(MultipartError::BadBoundary)
        );
        // Unterminated quote and junk parameters do not panic.
        assert!(MediaType::parse("a/b; x=\"unterminated\\").is_some());
        assert!(MediaType::parse("a/b; ;;; =; y").is_some());
        assert!(MediaType::parse("nonsense").is_none());
    }

    #[test]
    fn preamble_and_epilogue_are_ignored() {
        let body = b"this is a preamble\r\n--B\r\nContent-Type: text/plain\r\n\r\nhello\r\n--B--\r\nepilogue --B\r\n";
        let parts = p(body, "B").unwrap();
        assert_eq!(parts.len(), 1);
        assert_eq!(&parts[0].body[..], b"hello");
    }

    #[test]
    fn line_break_edge_cases() {
        // Bare LF everywhere.
        let parts = p(b"--B\nContent-Type: a/b\n\nx\n--B--", "B").unwrap();
        assert_eq!(&parts[0].body[..], b"x");
        // No headers at all: the part starts with the blank line.
        let parts = p(b"--B\r\n\r\nbody\r\n--B--", "B").unwrap();
        assert!(parts[0].headers.is_empty());
        assert_eq!(&parts[0].body[..], b"body");
        // Content that ends in CRLF keeps it; only the delimiter's break goes.
        let parts = p(b"--B\r\nContent-Type: a/b\r\n\r\nx\r\n\r\n--B--", "B").unwrap();
        assert_eq!(&parts[0].body[..], b"x\r\n");
        // Transport padding after the delimiter.
        let parts = p(b"--B  \t\r\nContent-Type: a/b\r\n\r\nx\r\n--B--", "B").unwrap();
        assert_eq!(&parts[0].body[..], b"x");
        // The boundary inside content but not at a line start is content.
        let parts = p(b"--B\r\n\r\nx--B y\r\n--B--", "B").unwrap();
        assert_eq!(&parts[0].body[..], b"x--B y");
        // Folded header.
        let parts = p(b"--B\r\nContent-Type: a/b;\r\n  x=1\r\n\r\nz\r\n--B--", "B").unwrap();
        assert_eq!(parts[0].header("content-type"), Some("a/b; x=1"));
    }

    #[test]
    fn malformed_bodies_are_named() {
        assert_eq!(p(b"", "B"), Err(MultipartError::NoDelimiter));
        assert_eq!(
            p(b"no delimiter here", "B"),
            Err(MultipartError::NoDelimiter)
        );
        assert_eq!(p(b"--B", "B"), Err(MultipartError::Truncated));
        assert_eq!(
            p(b"--B\r\nContent-Type: a/b\r\n\r\nhalf a part", "B"),
            Err(MultipartError::Truncated)
        );
        assert_eq!(p(b"--B--", "B"), Err(MultipartError::Empty));
        assert_eq!(
            p(b"--B\r\nContent-Type a/b\r\n\r\nx\r\n--B--", "B"),
            Err(MultipartError::BadHeader {
                part: 1,
                line: "Content-Type a/b".into()
            })
        );
        assert_eq!(
            p(b"--B\r\nContent-Type: a/b\r\n--B--", "B"),
            Err(MultipartError::BadHeaderBlock { part: 1 })
        );
        assert_eq!(
            p(b"--Bx\r\n\r\ny\r\n--B--", "B"),
            Err(MultipartError::NoDelimiter)
        );
        let parts = p(b"--B\r\n\r\nx\r\n--B--", "B").unwrap();
        assert_eq!(
            require_type(&parts, "application/dicom"),
            Err(MultipartError::MissingContentType { part: 1 })
        );
        let parts = p(b"--B\r\nContent-Type: text/plain\r\n\r\nx\r\n--B--", "B").unwrap();
        assert!(matches!(
            require_type(&parts, "application/dicom"),
            Err(MultipartError::WrongContentType { part: 1, .. })
        ));
    }

    #[test]
    fn limits_hold() {
        let b = "B";
        let body = build(&[("a/b", b"1"), ("a/b", b"2"), ("a/b", b"3")], b);
        let limits = Limits {
            max_parts: 2,
            max_bytes: 1 << 20,
        };
        assert_eq!(
            parse(&Bytes::from(body.clone()), b, &limits),
            Err(MultipartError::TooManyParts(2))
        );
        let limits = Limits {
            max_parts: 10,
            max_bytes: 10,
        };
        assert_eq!(
            parse(&Bytes::from(body), b, &limits),
            Err(MultipartError::TooLarge(10))
        );
    }

    #[test]
    fn every_prefix_of_a_body_is_an_error_or_parts_never_a_panic() {
        let body = build(
            &[
                ("application/dicom", b"abc".as_slice()),
                ("x/y", b"\r\n--".as_slice()),
            ],
            "bnd",
        );
        for n in 0..body.len() {
            let r = p(&body[..n], "bnd");
            if n + 2 < body.len() {
                assert!(r.is_err() || r.as_ref().is_ok_and(|v| v.len() <= 2), "{n}");
            }
        }
        assert_eq!(p(&body, "bnd").unwrap().len(), 2);
    }
}
