//! YAML text to a small located node tree. The only module that touches a YAML library.
//!
//! We drive yaml-rust2's event parser ourselves (rather than its `Yaml` loader) so that
//! every node keeps its 1-based line and column and every scalar keeps its style: a
//! quoted `"1"` must stay a string while a plain `1` is an integer.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use crate::diag::Loc;

/// A YAML node with its position.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub loc: Loc,
    pub kind: NodeKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum NodeKind {
    /// A scalar; `quoted` is true for single/double quoted and block (`|`, `>`) scalars,
    /// which are always strings.
    Scalar {
        value: String,
        quoted: bool,
    },
    Seq(Vec<Node>),
    /// Entries in document order; keys are nodes so that their positions are kept.
    Map(Vec<(Node, Node)>),
}

/// The resolved type of a plain scalar (YAML 1.2 core schema, as Kubernetes reads it).
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float,
    Str(&'a str),
}

impl Node {
    /// Interprets a scalar node; `None` for mappings and sequences.
    pub fn scalar(&self) -> Option<Scalar<'_>> {
        let NodeKind::Scalar { value, quoted } = &self.kind else {
            return None;
        };
        if *quoted {
            return Some(Scalar::Str(value));
        }
        Some(match value.as_str() {
            "" | "~" | "null" | "Null" | "NULL" => Scalar::Null,
            "true" | "True" | "TRUE" => Scalar::Bool(true),
            "false" | "False" | "FALSE" => Scalar::Bool(false),
            v => match parse_int(v) {
                Some(i) => Scalar::Int(i),
                None if is_float(v) => Scalar::Float,
                None => Scalar::Str(v),
            },
        })
    }

    pub fn is_null(&self) -> bool {
        matches!(self.scalar(), Some(Scalar::Null))
    }

    /// The key text of a mapping key (any scalar, as written).
    pub fn key_text(&self) -> Option<&str> {
        match &self.kind {
            NodeKind::Scalar { value, .. } => Some(value),
            _ => None,
        }
    }
}

fn parse_int(v: &str) -> Option<i64> {
    let (neg, digits) = match v.as_bytes().first()? {
        b'-' => (true, &v[1..]),
        b'+' => (false, &v[1..]),
        _ => (false, v),
    };
    let parsed = if let Some(hex) = digits.strip_prefix("0x") {
        i64::from_str_radix(hex, 16).ok()?
    } else if let Some(oct) = digits.strip_prefix("0o") {
        i64::from_str_radix(oct, 8).ok()?
    } else if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        digits.parse().ok()?
    } else {
        return None;
    };
    Some(if neg { -parsed } else { parsed })
}

fn is_float(v: &str) -> bool {
    matches!(
        v,
        ".inf" | "-.inf" | "+.inf" | ".nan" | ".NaN" | ".Inf" | "-.Inf"
    ) || (v.bytes().any(|b| b.is_ascii_digit())
        && v.bytes()
            .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b))
        && v.parse::<f64>().is_ok())
}

/// A YAML syntax error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub loc: Loc,
    pub message: String,
}

/// Parses every document of a YAML stream. Empty documents come back as null scalars.
pub fn parse(text: &str) -> Result<Vec<Node>, SyntaxError> {
    // The parser is not expected to panic, but user input must never take the process down.
    match std::panic::catch_unwind(|| parse_inner(text)) {
        Ok(r) => r,
        Err(_) => Err(SyntaxError {
            loc: Loc { line: 1, column: 1 },
            message: "the YAML parser failed on this file".into(),
        }),
    }
}

fn loc(m: &Marker) -> Loc {
    // yaml-rust2 markers: 1-based lines, 0-based columns.
    Loc {
        line: m.line(),
        column: m.col() + 1,
    }
}

/// Deeper documents are refused: later passes recurse over the tree.
const MAX_DEPTH: usize = 128;

enum Frame {
    Seq(Loc, Vec<Node>),
    /// Entries plus a pending key.
    Map(Loc, Vec<(Node, Node)>, Option<Node>),
}

fn parse_inner(text: &str) -> Result<Vec<Node>, SyntaxError> {
    let mut parser = Parser::new_from_str(text);
    let mut docs = Vec::new();
    let mut stack: Vec<Frame> = Vec::new();
    let mut anchors: HashMap<usize, Node> = HashMap::new();
    // Anchored collections whose node is still being built: (anchor id, stack depth).
    let mut open_anchors: Vec<(usize, usize)> = Vec::new();
    let mut root: Option<Node> = None;
    loop {
        let (ev, mark) = parser.next_token().map_err(|e| SyntaxError {
            loc: loc(e.marker()),
            message: e.info().to_string(),
        })?;
        let at = loc(&mark);
        let done: Option<(Node, usize)> = match ev {
            Event::StreamEnd => break,
            Event::StreamStart | Event::Nothing => None,
            Event::DocumentStart => {
                anchors.clear();
                root = None;
                None
            }
            Event::DocumentEnd => {
                docs.push(root.take().unwrap_or(Node {
                    loc: at,
                    kind: NodeKind::Scalar {
                        value: String::new(),
                        quoted: false,
                    },
                }));
                None
            }
            Event::Alias(id) => match anchors.get(&id) {
                Some(n) => Some((
                    Node {
                        loc: at,
                        kind: n.kind.clone(),
                    },
                    0,
                )),
                None => {
                    return Err(SyntaxError {
                        loc: at,
                        message: "unknown alias".into(),
                    });
                }
            },
            Event::Scalar(value, style, anchor, _tag) => {
                let quoted = !matches!(style, TScalarStyle::Plain);
                Some((
                    Node {
                        loc: at,
                        kind: NodeKind::Scalar { value, quoted },
                    },
                    anchor,
                ))
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _)
                if stack.len() >= MAX_DEPTH =>
            {
                let _ = anchor;
                return Err(SyntaxError {
                    loc: at,
                    message: format!("nesting deeper than {MAX_DEPTH} levels"),
                });
            }
            Event::SequenceStart(anchor, _) => {
                stack.push(Frame::Seq(at, Vec::new()));
                if anchor > 0 {
                    open_anchors.push((anchor, stack.len()));
                }
                None
            }
            Event::MappingStart(anchor, _) => {
                stack.push(Frame::Map(at, Vec::new(), None));
                if anchor > 0 {
                    open_anchors.push((anchor, stack.len()));
                }
                None
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let depth = stack.len();
                let node = match stack.pop() {
                    Some(Frame::Seq(l, items)) => Node {
                        loc: l,
                        kind: NodeKind::Seq(items),
                    },
                    // Block mapping start marks can sit past the first key; the first
                    // key is where a reader looks.
                    Some(Frame::Map(l, entries, _)) => Node {
                        loc: entries.first().map_or(l, |(k, _)| k.loc.min(l)),
                        kind: NodeKind::Map(entries),
                    },
                    None => continue,
                };
                let anchor = match open_anchors.last() {
                    Some(&(id, d)) if d == depth => {
                        open_anchors.pop();
                        id
                    }
                    _ => 0,
                };
                Some((node, anchor))
            }
        };
        let Some((node, anchor)) = done else { continue };
        if anchor > 0 {
            anchors.insert(anchor, node.clone());
        }
        match stack.last_mut() {
            None => root = Some(node),
            Some(Frame::Seq(_, items)) => items.push(node),
            Some(Frame::Map(_, entries, pending)) => match pending.take() {
                None => *pending = Some(node),
                Some(key) => entries.push((key, node)),
            },
        }
    }
    Ok(docs)
}

/// Locations of every node of a document by field path (`spec.rules[0].matches`), so that
/// checks that run after decoding can point at the offending node.
#[derive(Debug, Clone, Default)]
pub struct LocMap {
    map: HashMap<String, Loc>,
    root: Loc,
}

impl LocMap {
    pub fn build(root: &Node) -> LocMap {
        let mut m = LocMap {
            map: HashMap::new(),
            root: root.loc,
        };
        m.walk(root, String::new());
        m
    }

    fn walk(&mut self, node: &Node, path: String) {
        match &node.kind {
            NodeKind::Scalar { .. } => {}
            NodeKind::Seq(items) => {
                for (i, item) in items.iter().enumerate() {
                    self.walk(item, format!("{path}[{i}]"));
                }
            }
            NodeKind::Map(entries) => {
                for (k, v) in entries {
                    if let Some(key) = k.key_text() {
                        let p = join(&path, key);
                        // Keep the first occurrence of a duplicate key, as the decoder does.
                        if !self.map.contains_key(&p) {
                            self.walk(v, p.clone());
                        }
                    }
                }
            }
        }
        self.map.entry(path).or_insert(node.loc);
    }

    /// The location of the node at `path`, or of its nearest present ancestor.
    pub fn get(&self, path: &str) -> Loc {
        let mut p = path;
        loop {
            if let Some(l) = self.map.get(p) {
                return *l;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => return self.root,
            }
        }
    }
}

/// Joins a field path and a key.
pub fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_and_styles() {
        let docs = parse("a: 1\nb:\n  - x: \"1\"\n    y: 'z'\n---\n---\nc: [1, 2]\n").unwrap();
        assert_eq!(docs.len(), 3);
        let NodeKind::Map(entries) = &docs[0].kind else {
            panic!()
        };
        assert_eq!(entries[0].0.loc, Loc { line: 1, column: 1 });
        assert_eq!(entries[0].1.loc, Loc { line: 1, column: 4 });
        assert_eq!(entries[0].1.scalar(), Some(Scalar::Int(1)));
        let NodeKind::Seq(items) = &entries[1].1.kind else {
            panic!()
        };
        let NodeKind::Map(item) = &items[0].kind else {
            panic!()
        };
        assert_eq!(item[0].1.loc, Loc { line: 3, column: 8 });
        assert_eq!(item[0].1.scalar(), Some(Scalar::Str("1")));
        assert_eq!(item[1].0.loc, Loc { line: 4, column: 5 });
        assert!(docs[1].is_null());
        let locs = LocMap::build(&docs[0]);
        assert_eq!(locs.get("b[0].y"), Loc { line: 4, column: 8 });
        assert_eq!(locs.get("b[0].missing"), locs.get("b[0]"));
        assert_eq!(locs.get("b[0]"), Loc { line: 3, column: 5 });
        assert_eq!(locs.get("b"), Loc { line: 3, column: 3 });
        let flow = parse(
            "x: {a: 1}
",
        )
        .unwrap();
        assert_eq!(LocMap::build(&flow[0]).get("x"), Loc { line: 1, column: 4 });
    }

    #[test]
    fn plain_scalar_types() {
        let docs = parse("[~, true, 0x10, -3, 1.5, abc, '', 08]").unwrap();
        let NodeKind::Seq(items) = &docs[0].kind else {
            panic!()
        };
        let got: Vec<_> = items.iter().map(|n| n.scalar().unwrap()).collect();
        assert_eq!(
            got,
            vec![
                Scalar::Null,
                Scalar::Bool(true),
                Scalar::Int(16),
                Scalar::Int(-3),
                Scalar::Float,
                Scalar::Str("abc"),
                Scalar::Str(""),
                Scalar::Int(8),
            ]
        );
    }

    #[test]
    fn syntax_error_is_located() {
        let err = parse("a: 1\nb: [1, 2\nc: 3\n").unwrap_err();
        assert!(err.loc.line >= 2, "{err:?}");
        let err = parse("a: b: c\n").unwrap_err();
        assert_eq!(err.loc.line, 1, "{err:?}");
    }

    #[test]
    fn deep_nesting_is_refused() {
        let deep = "[".repeat(10_000);
        let err = parse(&deep).unwrap_err();
        assert!(
            err.message.contains("nesting") || err.message.contains("recursion"),
            "{err:?}"
        );
    }

    #[test]
    fn anchors_and_aliases() {
        let docs = parse("a: &x {k: v}\nb: *x\n").unwrap();
        let NodeKind::Map(entries) = &docs[0].kind else {
            panic!()
        };
        assert!(matches!(entries[1].1.kind, NodeKind::Map(_)));
    }
}
