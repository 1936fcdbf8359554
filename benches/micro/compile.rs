//! Parsing, validating and compiling a config of 1,000 Services (what a reload costs).

use criterion::{Criterion, criterion_group, criterion_main};

mod mesh;

fn compile(c: &mut Criterion) {
    let yaml = mesh::services(1000);
    let sources = vec![("bench.yaml".to_string(), yaml)];
    // Fail loudly rather than time the error path.
    assert_eq!(
        tern_config::load_sources(&sources)
            .expect("benchmark config is valid")
            .snapshot
            .services
            .len(),
        1000
    );
    let mut group = c.benchmark_group("compile");
    group.sample_size(10);
    group.bench_function("1,000 services + slices + routes", |b| {
        b.iter(|| tern_config::load_sources(&sources).map(|c| c.snapshot.backends.len()))
    });
    group.finish();
}

criterion_group!(benches, compile);
criterion_main!(benches);
