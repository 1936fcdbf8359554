//! The in-memory index of config documents that every source writes into.
//!
//! A source applies and deletes documents (one YAML document each, named like
//! `file.yaml#3`), then publishes. Publishing validates the whole set; a valid set becomes
//! the new [`Snapshot`] on a watch channel, an invalid one is refused and the last good
//! snapshot stays published. The file source does this today; a Kubernetes source later
//! applies and deletes objects one at a time through the same three calls.

use std::collections::BTreeMap;
use std::sync::Arc;

use tern_config::Diagnostic;
use tern_config::model::{Key, Object};
use tokio::sync::watch;
use tokio::time::Instant;

/// One YAML document of the config with the resource it decodes to.
#[derive(Debug, Clone)]
pub struct Doc {
    /// `file.yaml#3`.
    pub name: String,
    pub yaml: String,
    pub object: Object,
}

impl Doc {
    pub fn key(&self) -> Key {
        self.object.key()
    }
}

/// A validated set of documents, as published.
#[derive(Debug)]
pub struct Snapshot {
    /// Counts publications, from 1; 0 is the empty snapshot before the first one.
    pub generation: u64,
    /// Documents by name.
    pub docs: BTreeMap<String, Doc>,
    /// When the first change that this snapshot contains was seen by its source (for the
    /// change-to-ACK latency). `None` for the empty initial snapshot.
    pub changed_at: Option<Instant>,
}

impl Snapshot {
    pub fn empty() -> Snapshot {
        Snapshot {
            generation: 0,
            docs: BTreeMap::new(),
            changed_at: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// The document does not decode to exactly one resource.
    #[error("{name}: {}", describe(diagnostics))]
    BadDocument {
        name: String,
        diagnostics: Vec<Diagnostic>,
    },
    /// The set as a whole does not validate: nothing was published.
    #[error("{}", describe(diagnostics))]
    Invalid { diagnostics: Vec<Diagnostic> },
}

fn describe(diags: &[Diagnostic]) -> String {
    let mut s = format!("invalid config: {}", tern_config::counts(diags));
    for d in diags {
        s.push('\n');
        s.push_str(&d.to_string());
    }
    s
}

/// What a successful publication reports.
#[derive(Debug, Clone)]
pub struct Published {
    pub generation: u64,
    pub documents: usize,
    pub warnings: Vec<Diagnostic>,
}

/// The documents being edited by a source, and the channel their snapshots go out on.
#[derive(Debug)]
pub struct Index {
    pending: BTreeMap<String, Doc>,
    first_change: Option<Instant>,
    tx: watch::Sender<Arc<Snapshot>>,
}

impl Default for Index {
    fn default() -> Self {
        Index::new()
    }
}

impl Index {
    pub fn new() -> Index {
        let (tx, _) = watch::channel(Arc::new(Snapshot::empty()));
        Index {
            pending: BTreeMap::new(),
            first_change: None,
            tx,
        }
    }

    /// Receives every published snapshot (the latest one only, if it falls behind).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// The last published snapshot.
    pub fn current(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// Notes that a change was seen now (kept until the next successful publish), so the
    /// change-to-ACK latency starts when the source saw the change rather than when it
    /// finished reading it.
    pub fn mark_changed(&mut self) {
        self.first_change.get_or_insert_with(Instant::now);
    }

    /// Adds or replaces one document (decoded on its own). Not visible until [`publish`].
    ///
    /// [`publish`]: Index::publish
    pub fn apply(&mut self, name: &str, yaml: &str) -> Result<Key, IndexError> {
        if let Some(doc) = self.pending.get(name)
            && doc.yaml == yaml
        {
            return Ok(doc.key());
        }
        let mut diagnostics = Vec::new();
        let mut objects = tern_config::decode::decode_file(name, yaml, &mut diagnostics);
        if objects.len() != 1 || diagnostics.iter().any(Diagnostic::is_error) {
            return Err(IndexError::BadDocument {
                name: name.to_string(),
                diagnostics,
            });
        }
        let object = objects.remove(0);
        let key = object.key();
        self.mark_changed();
        self.pending.insert(
            name.to_string(),
            Doc {
                name: name.to_string(),
                yaml: yaml.to_string(),
                object,
            },
        );
        Ok(key)
    }

    /// Removes a document; true if it was there.
    pub fn delete(&mut self, name: &str) -> bool {
        let removed = self.pending.remove(name).is_some();
        if removed {
            self.mark_changed();
        }
        removed
    }

    /// Names of the documents currently held (published or not).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.pending.keys().map(String::as_str)
    }

    /// Validates the documents held and publishes them as the new snapshot. When they do
    /// not validate, nothing is published and the last good snapshot stays current. When
    /// nothing changed since the last publication, nothing is sent either.
    pub fn publish(&mut self) -> Result<Published, IndexError> {
        let current = self.current();
        let unchanged = current.generation > 0
            && current.docs.len() == self.pending.len()
            && current
                .docs
                .iter()
                .zip(&self.pending)
                .all(|((a, da), (b, db))| a == b && da.yaml == db.yaml);
        if unchanged {
            self.first_change = None;
            return Ok(Published {
                generation: current.generation,
                documents: current.docs.len(),
                warnings: Vec::new(),
            });
        }
        let diagnostics = self.validate();
        if diagnostics.iter().any(Diagnostic::is_error) {
            return Err(IndexError::Invalid { diagnostics });
        }
        let generation = current.generation + 1;
        let snapshot = Snapshot {
            generation,
            docs: self.pending.clone(),
            changed_at: Some(self.first_change.take().unwrap_or_else(Instant::now)),
        };
        let documents = snapshot.docs.len();
        self.tx.send_replace(Arc::new(snapshot));
        Ok(Published {
            generation,
            documents,
            warnings: diagnostics,
        })
    }

    /// Validates the documents held, reusing their decoded objects (no re-parsing). A
    /// duplicate object is rare: then everything is re-checked from the text, which
    /// reports it with both places.
    fn validate(&self) -> Vec<Diagnostic> {
        let mut resources = tern_config::Resources::new();
        for doc in self.pending.values() {
            if resources.apply(doc.object.clone()).is_some() {
                let sources: Vec<(String, String)> = self
                    .pending
                    .values()
                    .map(|d| (d.name.clone(), d.yaml.clone()))
                    .collect();
                return tern_config::check_sources(&sources).diagnostics;
            }
        }
        tern_config::validate::validate(&resources)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: a\n  namespace: shop\nspec:\n  ports:\n  - port: 80\n";

    #[test]
    fn publishes_valid_sets_and_keeps_the_last_good_one() {
        let mut index = Index::new();
        let rx = index.subscribe();
        let key = index.apply("a.yaml#1", SVC).unwrap();
        assert_eq!(key.to_string(), "Service shop/a");
        assert_eq!(index.publish().unwrap().generation, 1);
        assert_eq!(rx.borrow().docs.len(), 1);

        // Unchanged: no new generation.
        assert_eq!(index.publish().unwrap().generation, 1);

        // A route to a Service that does not exist: refused, snapshot 1 stays.
        let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: r\n  namespace: shop\nspec:\n  parentRefs:\n  - kind: Service\n    group: \"\"\n    name: nope\n  rules:\n  - backendRefs:\n    - name: a\n      port: 80\n";
        index.apply("r.yaml#1", route).unwrap();
        let err = index.publish().unwrap_err();
        assert!(err.to_string().contains("no Service shop/nope"), "{err}");
        assert_eq!(rx.borrow().generation, 1);

        assert!(index.delete("r.yaml#1"));
        assert_eq!(index.publish().unwrap().generation, 1);
        assert!(index.apply("bad.yaml#1", "kind: [").is_err());

        // The same object twice is refused, naming the first one.
        index.apply("b.yaml#1", SVC).unwrap();
        let err = index.publish().unwrap_err().to_string();
        assert!(err.contains("duplicate Service shop/a"), "{err}");
        assert_eq!(rx.borrow().generation, 1);
    }
}
