//! An in-memory set of resources keyed by kind, namespace and name.
//!
//! The file source fills it in one go today; a Kubernetes watcher can later apply and
//! delete objects one at a time and re-run validation and compilation on the set.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::model::{Key, Kind, Object, Resource, Service};

#[derive(Debug, Clone, Default)]
pub struct Resources {
    objects: BTreeMap<Key, Object>,
}

impl Resources {
    pub fn new() -> Resources {
        Resources::default()
    }

    /// Inserts or replaces an object; returns the one it replaced.
    pub fn apply(&mut self, object: Object) -> Option<Object> {
        self.objects.insert(object.key(), object)
    }

    pub fn delete(&mut self, key: &Key) -> Option<Object> {
        self.objects.remove(key)
    }

    pub fn get(&self, key: &Key) -> Option<&Object> {
        self.objects.get(key)
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// Every object, ordered by kind, namespace and name.
    pub fn iter(&self) -> impl Iterator<Item = &Object> {
        self.objects.values()
    }

    pub fn of_kind(&self, kind: Kind) -> impl Iterator<Item = &Object> {
        self.objects
            .range(
                Key {
                    kind,
                    namespace: String::new(),
                    name: String::new(),
                }..,
            )
            .take_while(move |(k, _)| k.kind == kind)
            .map(|(_, o)| o)
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        let key = Key {
            kind: Kind::Service,
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        match &self.objects.get(&key)?.resource {
            Resource::Service(s) => Some(s),
            _ => None,
        }
    }

    /// Content version: the first 16 hex chars of the SHA-256 of a canonical JSON rendering
    /// of every resource in key order, so file names and document order do not matter.
    pub fn version(&self) -> String {
        let canonical: Vec<&Resource> = self.objects.values().map(|o| &o.resource).collect();
        // Serializing plain data structs to a string cannot fail.
        let text = serde_json::to_string(&canonical).unwrap_or_default();
        let digest = Sha256::digest(text.as_bytes());
        crate::hex(&digest[..8])
    }
}
