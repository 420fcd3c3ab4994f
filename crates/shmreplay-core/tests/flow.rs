//! Flow control through the Rust API: each limiter's decisions against Reverb's formulas, call
//! by call; a queue's exactly-once, in-order delivery with threads on separate handles; waits
//! ended by an insert, a timeout and a shutdown.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use shmreplay_core::{
    DType, Error, InColumn, Limiter, OutColumn, ReplayBuffer, Sampler, Schema, WaitUpTo,
};

fn schema() -> Schema {
    Schema::new(&[("value", DType::U64, vec![])]).unwrap()
}

fn create(capacity: u64, sampler: Sampler, limiter: Option<Limiter>) -> ReplayBuffer {
    let buffer = ReplayBuffer::builder(&shmreplay_core::unique_name())
        .dir(std::env::temp_dir())
        .capacity(capacity)
        .schema(schema())
        .sampler(sampler)
        .limiter(limiter)
        .create()
        .unwrap();
    buffer.unlink().unwrap();
    buffer
}

fn insert(
    buffer: &ReplayBuffer,
    values: &[u64],
    timeout: Option<Duration>,
) -> Result<usize, Error> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    buffer.extend_columns_with_priorities(
        &[InColumn::from_slice(&bytes)],
        None,
        &mut WaitUpTo(timeout),
    )
}

/// Samples `n` rows: their values and keys.
fn sample(
    buffer: &ReplayBuffer,
    n: usize,
    timeout: Option<Duration>,
) -> Result<(Vec<u64>, Vec<u64>), Error> {
    let mut bytes = vec![0u8; 8 * n];
    let (mut index, mut key) = (vec![0u64; n], vec![0u64; n]);
    buffer.sample_columns(
        &[OutColumn::from_slice(&mut bytes)],
        &mut index,
        &mut key,
        &mut WaitUpTo(timeout),
    )?;
    let values = bytes
        .chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    Ok((values, key))
}

const NOW: Option<Duration> = Some(Duration::ZERO);

#[test]
fn limiters_decide_as_reverbs_formulas_call_by_call() {
    let capacity = 40u64;
    let limiters = [
        Limiter::MinSize(5),
        Limiter::sample_to_insert_ratio(2.0, 4, 3.0),
        Limiter::SampleToInsertRatio {
            samples_per_insert: 0.5,
            min_size: 2,
            min_diff: -3.0,
            max_diff: 2.0,
        },
    ];
    for limiter in limiters {
        let buffer = create(capacity, Sampler::Uniform, Some(limiter));
        let l = limiter.limits();
        let (mut inserts, mut samples) = (0u64, 0u64);
        // A fixed pseudo-random script of inserts and samples of 1 to 4 rows.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for step in 0..400 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let rows = 1 + state % 4;
            let deletes = inserts.saturating_sub(capacity);
            let size = inserts - deletes;
            if state & 16 == 0 {
                if rows as f64 * l.samples_per_insert > l.window() {
                    let refused = insert(&buffer, &[0; 4][..rows as usize], NOW);
                    assert!(
                        matches!(refused, Err(Error::InvalidArgument(_))),
                        "{refused:?}"
                    );
                    continue;
                }
                let allowed = size + rows <= l.min_size
                    || (inserts + rows) as f64 * l.samples_per_insert - samples as f64
                        <= l.max_diff;
                assert_eq!(buffer.can_insert(rows), allowed, "{limiter:?} step {step}");
                let values: Vec<u64> = (inserts..inserts + rows).collect();
                match insert(&buffer, &values, NOW) {
                    Ok(_) => {
                        assert!(
                            allowed,
                            "{limiter:?} step {step}: an insert not allowed went in"
                        );
                        inserts += rows;
                    }
                    Err(Error::Timeout(_)) => assert!(!allowed, "{limiter:?} step {step}"),
                    Err(e) => panic!("{e}"),
                }
            } else {
                let allowed = size >= l.min_size
                    && inserts as f64 * l.samples_per_insert - samples as f64 - rows as f64
                        >= l.min_diff;
                assert_eq!(buffer.can_sample(rows), allowed, "{limiter:?} step {step}");
                match sample(&buffer, rows as usize, NOW) {
                    Ok(_) => {
                        assert!(allowed, "{limiter:?} step {step}: a sample not allowed ran");
                        samples += rows;
                    }
                    Err(Error::Timeout(_)) => assert!(!allowed, "{limiter:?} step {step}"),
                    Err(e) => panic!("{e}"),
                }
            }
            let counts = buffer.flow_counts();
            assert_eq!((counts.inserts, counts.samples), (inserts, samples));
        }
        assert!(
            inserts > 20 && samples > 20,
            "{limiter:?}: the script must exercise both sides"
        );
    }
}

#[test]
fn limits_that_could_deadlock_are_refused() {
    let refused = |limiter| {
        ReplayBuffer::builder(&shmreplay_core::unique_name())
            .dir(std::env::temp_dir())
            .capacity(100)
            .schema(schema())
            .limiter(Some(limiter))
            .create()
            .map(|b| b.unlink())
            .is_err()
    };
    assert!(refused(Limiter::MinSize(0)));
    assert!(refused(Limiter::MinSize(101)));
    assert!(
        refused(Limiter::sample_to_insert_ratio(2.0, 10, 1.9)),
        "window below 2·spi"
    );
    assert!(refused(Limiter::sample_to_insert_ratio(0.0, 10, 10.0)));
    assert!(refused(Limiter::SampleToInsertRatio {
        samples_per_insert: 1.0,
        min_size: 10,
        min_diff: 11.0,
        max_diff: 20.0
    }));
    assert!(!refused(Limiter::sample_to_insert_ratio(2.0, 10, 2.0)));
    // Batches wider than the window could never pass it.
    let buffer = create(
        100,
        Sampler::Uniform,
        Some(Limiter::sample_to_insert_ratio(1.0, 5, 4.0)),
    );
    insert(&buffer, &[1, 2, 3, 4, 5], None).unwrap();
    assert!(matches!(
        sample(&buffer, 9, None),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        insert(&buffer, &[0; 9], None),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn a_queue_delivers_every_row_once_in_order_across_threads() {
    const PRODUCERS: u64 = 3;
    const ROWS: u64 = 3000;
    let name = shmreplay_core::unique_name();
    let dir = std::env::temp_dir();
    let creator = ReplayBuffer::builder(&name)
        .dir(&dir)
        .capacity(64)
        .schema(schema())
        .sampler(Sampler::Queue)
        .create()
        .unwrap();
    let start = Arc::new(Barrier::new(PRODUCERS as usize + 3)); // and 2 consumers, and us
                                                                // Set once every producer has returned: until then a consumer's timeout only means the
                                                                // producers are slow (descheduled on a loaded machine), and it waits again.
    let produced = Arc::new(AtomicBool::new(false));
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let (name, dir, start) = (name.clone(), dir.clone(), start.clone());
            thread::spawn(move || {
                let buffer = ReplayBuffer::attach(&name, Some(&dir)).unwrap();
                start.wait();
                let mut next = 0;
                while next < ROWS {
                    let n = 1 + (next * 7 + p) % 13;
                    let values: Vec<u64> =
                        (next..(next + n).min(ROWS)).map(|i| p << 32 | i).collect();
                    insert(&buffer, &values, None).unwrap();
                    next += values.len() as u64;
                }
            })
        })
        .collect();
    let consumers: Vec<_> = (0..2)
        .map(|_| {
            let (name, dir, start, produced) =
                (name.clone(), dir.clone(), start.clone(), produced.clone());
            thread::spawn(move || {
                let buffer = ReplayBuffer::attach(&name, Some(&dir)).unwrap();
                start.wait();
                let mut got = Vec::new();
                loop {
                    match sample(&buffer, 5, Some(Duration::from_secs(1))) {
                        Ok((values, keys)) => {
                            assert!(keys.windows(2).all(|k| k[1] == k[0] + 1), "{keys:?}");
                            got.extend(values.into_iter().zip(keys));
                        }
                        Err(Error::Timeout(_)) if produced.load(Ordering::SeqCst) => return got,
                        Err(Error::Timeout(_)) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
            })
        })
        .collect();
    start.wait();
    for p in producers {
        p.join().unwrap();
    }
    produced.store(true, Ordering::SeqCst);
    let mut delivered: Vec<(u64, u64)> = consumers
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    // What is left (fewer than a batch) comes out one by one.
    while let Ok((values, keys)) = sample(&creator, 1, NOW) {
        delivered.push((values[0], keys[0]));
    }
    delivered.sort_by_key(|&(_, key)| key);
    assert_eq!(
        delivered.len() as u64,
        PRODUCERS * ROWS,
        "every row exactly once"
    );
    assert!(delivered
        .iter()
        .enumerate()
        .all(|(i, &(_, key))| key == i as u64));
    for p in 0..PRODUCERS {
        let mine: Vec<u64> = delivered
            .iter()
            .filter(|&&(v, _)| v >> 32 == p)
            .map(|&(v, _)| v & 0xffff_ffff)
            .collect();
        assert_eq!(
            mine,
            (0..ROWS).collect::<Vec<_>>(),
            "producer {p}: in order, none lost"
        );
    }
    assert_eq!(creator.len(), 0);
    assert_eq!(creator.stats().deletes, PRODUCERS * ROWS);
    creator.unlink().ok();
}

/// A queue of 8 with 8 rows: an insert waits.
fn full_queue() -> Arc<ReplayBuffer> {
    let buffer = create(8, Sampler::Queue, None);
    insert(&buffer, &[0; 8], None).unwrap();
    Arc::new(buffer)
}

#[test]
fn waits_end_with_the_insert_they_wait_for_a_timeout_or_a_shutdown() {
    let buffer = Arc::new(create(8, Sampler::Queue, None));
    // A waiting sample is woken by the insert it waits for.
    let waiter = {
        let buffer = buffer.clone();
        thread::spawn(move || sample(&buffer, 2, None))
    };
    thread::sleep(Duration::from_millis(50));
    insert(&buffer, &[7, 8], None).unwrap();
    assert_eq!(waiter.join().unwrap().unwrap().0, [7, 8]);
    // A timeout takes nothing.
    insert(&buffer, &[9], None).unwrap();
    let started = Instant::now();
    assert!(matches!(
        sample(&buffer, 2, Some(Duration::from_millis(100))),
        Err(Error::Timeout(_))
    ));
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert_eq!(buffer.len(), 1);
    assert!(buffer.stats().sample_wait_ns >= 100_000_000);
    // A full queue: the insert waits, until shutdown (within 100 ms, on the median of three
    // buffers: one wake may be late on a loaded machine; a waiter that never noticed the
    // shutdown would break the 1 s ceiling).
    insert(&buffer, &[0; 7], None).unwrap();
    let mut latencies: Vec<Duration> = [buffer.clone(), full_queue(), full_queue()]
        .into_iter()
        .map(|buffer| {
            let waiter = {
                let buffer = buffer.clone();
                thread::spawn(move || {
                    let result = insert(&buffer, &[1], None);
                    (result, Instant::now())
                })
            };
            thread::sleep(Duration::from_millis(100));
            let shut = Instant::now();
            buffer.shutdown();
            let (result, ended) = waiter.join().unwrap();
            assert!(matches!(result, Err(Error::Shutdown)), "{result:?}");
            let latency = ended.duration_since(shut);
            assert!(latency < Duration::from_secs(1), "{latency:?}");
            latency
        })
        .collect();
    latencies.sort();
    assert!(latencies[1] < Duration::from_millis(100), "{latencies:?}");
    // After shutdown: what need not wait still works (draining), the rest fails at once.
    assert_eq!(sample(&buffer, 8, None).unwrap().0[0], 9);
    assert!(matches!(sample(&buffer, 1, None), Err(Error::Shutdown)));
    assert!(matches!(sample(&buffer, 1, NOW), Err(Error::Shutdown)));
}
