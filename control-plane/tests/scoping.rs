//! Every scope of tern-config's valid fixture mesh (HTTPRoutes, GRPCRoutes, every policy
//! kind) validates on its own: each Service called alone, each Service as the sidecar's
//! own, and both together.

use std::path::Path;

use tern_api::v1::ConfigPush;
use tern_config::model::Kind;
use tern_control::file::sync_index;
use tern_control::index::Index;
use tern_control::scope::{Lookup, Scope, scoped_push};

fn validates(what: &str, push: &ConfigPush) {
    if let Err(e) = tern_config::load_sources(&push.sources()) {
        panic!("scope {what}: does not validate: {e}");
    }
}

#[test]
fn every_scope_of_the_fixture_mesh_validates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/tests/fixtures/valid");
    let sources = tern_config::read_dir_sources(&dir).unwrap();
    tern_config::load_sources(&sources).expect("the fixture mesh is valid");
    let mut index = Index::new();
    sync_index(&mut index, &sources).unwrap();
    let snap = index.current();
    let lookup = Lookup::build(&snap);
    let services: Vec<String> = snap
        .docs
        .values()
        .filter(|d| d.key().kind == Kind::Service)
        .map(|d| format!("{}/{}", d.key().namespace, d.key().name))
        .collect();
    assert!(services.len() >= 3, "{services:?}");
    let mut sizes = Vec::new();
    for svc in &services {
        let calls = scoped_push(&snap, &lookup, &Scope::new([svc.clone()], ""));
        validates(&format!("calls {svc}"), &calls);
        assert!(!calls.documents.is_empty());
        sizes.push(calls.documents.len());
        validates(
            &format!("own {svc}"),
            &scoped_push(&snap, &lookup, &Scope::new([], svc)),
        );
        for other in &services {
            validates(
                &format!("calls {other}, own {svc}"),
                &scoped_push(&snap, &lookup, &Scope::new([other.clone()], svc)),
            );
        }
    }
    // Scoping leaves something out somewhere.
    assert!(sizes.iter().any(|&n| n < snap.docs.len()), "{sizes:?}");
}
