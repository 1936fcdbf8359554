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

#[test]
fn authorization_policies_reach_the_called_sidecar_only() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/tests/fixtures/valid");
    let sources = tern_config::read_dir_sources(&dir).unwrap();
    let mut index = Index::new();
    sync_index(&mut index, &sources).unwrap();
    let snap = index.current();
    let lookup = Lookup::build(&snap);
    let authz = |push: &ConfigPush| -> Vec<String> {
        push.documents
            .iter()
            .map(|d| snap.docs[&d.name].key())
            .filter(|k| k.kind == Kind::AuthorizationPolicy)
            .map(|k| k.name)
            .collect()
    };
    let all: Vec<String> = snap
        .docs
        .values()
        .map(|d| d.key())
        .filter(|k| k.kind == Kind::AuthorizationPolicy)
        .map(|k| k.name)
        .collect();
    assert_eq!(all.len(), 3, "{all:?}");
    // Checkout's own sidecar (calling checkout-v1) gets every policy on checkout and its
    // routes; a sidecar that only calls checkout gets none of them.
    let own = scoped_push(
        &snap,
        &lookup,
        &Scope::new(["shop/checkout-v1".to_string()], "shop/checkout"),
    );
    validates("own checkout", &own);
    let mut got = authz(&own);
    got.sort();
    let mut want = all.clone();
    want.sort();
    assert_eq!(got, want);
    let caller = scoped_push(
        &snap,
        &lookup,
        &Scope::new(["shop/checkout".to_string()], "shop/checkout-v1"),
    );
    validates("calls checkout", &caller);
    assert_eq!(authz(&caller), Vec::<String>::new());
}
