//! Micro-benchmarks of the copy kernels and of the sampler, against plain memory copies.
//!
//! `cargo bench -p shmreplay-core --bench kernels` (add `-- --quick` for a short run).
//! Figures are bytes per second; compare a kernel with its `copy_from_slice` baseline.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use shmreplay_core::{copy, DType, ReplayBuffer, Schema};

/// An Atari frame pair and a control record's observation: the field sizes that matter.
const SIZES: [usize; 2] = [28_224, 72];

fn copy_kernels(c: &mut Criterion) {
    let mut group = c.benchmark_group("copy");
    for size in SIZES {
        let shared = vec![0u64; size.div_ceil(8)];
        let mut private = vec![1u8; size];
        group.throughput(Throughput::Bytes(size as u64));
        for kernel in copy::Kernel::available() {
            group.bench_with_input(
                BenchmarkId::new(format!("load_{}", kernel.name()), size),
                &size,
                |b, _| {
                    // SAFETY: `shared` is 8-aligned, holds `size` rounded up to words, and only this
                    // thread touches it; `private` holds `size` bytes.
                    b.iter(|| unsafe {
                        kernel.load(
                            black_box(private.as_mut_ptr()),
                            shared.as_ptr().cast(),
                            size,
                        )
                    })
                },
            );
            group.bench_with_input(
                BenchmarkId::new(format!("store_{}", kernel.name()), size),
                &size,
                |b, _| {
                    // SAFETY: as above, the other way round.
                    b.iter(|| unsafe {
                        kernel.store(
                            shared.as_ptr().cast::<u8>().cast_mut(),
                            black_box(private.as_ptr()),
                            size,
                        )
                    })
                },
            );
        }
        let mut target = vec![0u8; size];
        group.bench_with_input(BenchmarkId::new("copy_from_slice", size), &size, |b, _| {
            b.iter(|| black_box(&mut target).copy_from_slice(black_box(&private)))
        });
    }
    group.finish();
}

fn control_schema() -> Schema {
    Schema::new(&[
        ("obs", DType::F32, vec![17]),
        ("next_obs", DType::F32, vec![17]),
        ("action", DType::F32, vec![6]),
        ("reward", DType::F32, vec![]),
        ("done", DType::Bool, vec![]),
    ])
    .expect("a valid schema")
}

/// `sample_into` of 256 control rows from full buffers of growing capacity, and the same
/// gather done by plain indexing of a private array of the same records.
fn sampling(c: &mut Criterion) {
    const BATCH: usize = 256;
    let mut group = c.benchmark_group("sample_control_b256");
    for capacity in [100_000u64, 1_000_000, 10_000_000] {
        let schema = control_schema();
        let sizes: Vec<usize> = schema.fields().iter().map(|f| f.bytes).collect();
        let row_bytes: usize = sizes.iter().sum();
        let dir = std::env::temp_dir();
        let name = shmreplay_core::unique_name();
        let buffer = ReplayBuffer::create(&name, None, capacity, schema).expect("create");
        let fill = 65_536usize;
        let columns: Vec<Vec<u8>> = sizes.iter().map(|s| vec![7u8; s * fill]).collect();
        let column_refs: Vec<&[u8]> = columns.iter().map(|c| c.as_slice()).collect();
        for _ in 0..capacity.div_ceil(fill as u64) {
            buffer.extend(&column_refs).expect("extend");
        }
        let mut out: Vec<Vec<u8>> = sizes.iter().map(|s| vec![0u8; s * BATCH]).collect();
        let (mut index, mut key) = (vec![0u64; BATCH], vec![0u64; BATCH]);
        group.throughput(Throughput::Bytes((row_bytes * BATCH) as u64));
        group.bench_with_input(
            BenchmarkId::new("shmreplay", capacity),
            &capacity,
            |b, _| {
                b.iter(|| {
                    let mut outs: Vec<&mut [u8]> =
                        out.iter_mut().map(|o| o.as_mut_slice()).collect();
                    buffer
                        .sample_into(&mut outs, &mut index, &mut key)
                        .expect("sample");
                })
            },
        );
        buffer.unlink().expect("unlink");
        drop(buffer);
        let _ = dir;

        let private = vec![7u8; row_bytes * capacity as usize];
        let mut gathered = vec![0u8; row_bytes * BATCH];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        group.bench_with_input(
            BenchmarkId::new("private_gather", capacity),
            &capacity,
            |b, &cap| {
                b.iter(|| {
                    for row in gathered.chunks_exact_mut(row_bytes) {
                        state = state
                            .wrapping_mul(6_364_136_223_846_793_005)
                            .wrapping_add(1);
                        let i = ((u128::from(state) * u128::from(cap)) >> 64) as usize;
                        row.copy_from_slice(&private[i * row_bytes..(i + 1) * row_bytes]);
                    }
                    black_box(&gathered);
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, copy_kernels, sampling);
criterion_main!(benches);
