//! Episode buffers, checked against an oracle: writer threads interleave the episodes of their
//! envs in one small ring that wraps many times, while samplers check every item (stacks,
//! n-step return, bootstrap stack, discount, flags, sequences) against what the writers wrote.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shmreplay_core::{
    DType, EpisodeBuffer, EpisodeWriter, Episodes, Error, InColumn, NoBlocking, OutColumn, Padding,
    Schema, SequenceColumns, StepColumns,
};

const GAMMA: f64 = 0.9;

/// Length (steps) of episode `episode` of env `env` of writer `writer`, and whether it
/// terminates (else it is truncated).
fn episode(writer: u32, env: u32, episode: u32) -> (u32, bool) {
    let h = (writer * 7919 + env * 104_729 + episode * 1_299_709).wrapping_mul(2_654_435_761);
    (1 + (h >> 8) % 12, h % 3 != 0)
}

fn reward(frame: [u32; 4]) -> f32 {
    (frame[0] * 3 + frame[1] * 5 + frame[2] * 7 + frame[3]) as f32 % 17.0
}

fn action(frame: [u32; 4]) -> i64 {
    ((frame[0] as i64) << 48)
        | ((frame[1] as i64) << 32)
        | ((frame[2] as i64) << 16)
        | frame[3] as i64
}

fn buffer(
    name: &str,
    capacity: u64,
    stack: usize,
    n_step: usize,
    padding: Padding,
) -> EpisodeBuffer {
    let schema = Schema::new(&[
        ("obs", DType::U32, vec![4]),
        ("action", DType::I64, vec![]),
        ("reward", DType::F32, vec![]),
    ])
    .unwrap();
    EpisodeBuffer::builder(name)
        .dir(std::env::temp_dir())
        .capacity(capacity)
        .schema(schema)
        .episodes(Episodes {
            observations: vec!["obs".into()],
            reward: Some("reward".into()),
            frame_stack: stack,
            padding,
            n_step,
            gamma: GAMMA,
        })
        .create()
        .unwrap()
}

/// Writes `steps` vector-env steps of `envs` envs as writer `id`, calling `midway` once half
/// of them are written.
fn write(buffer: &EpisodeBuffer, id: u32, envs: u32, steps: u32, midway: impl Fn()) {
    let mut writer: EpisodeWriter = buffer.writer(envs as usize).unwrap();
    // (episode, position of the last frame written, ended)
    let mut at: Vec<(u32, u32, bool)> = (0..envs).map(|_| (0, 0, false)).collect();
    let first: Vec<u8> = (0..envs)
        .flat_map(|e| [id, e, 0, 0])
        .flat_map(u32::to_ne_bytes)
        .collect();
    buffer
        .reset(
            &mut writer,
            &(0..envs as usize).collect::<Vec<_>>(),
            &[InColumn::from_slice(&first)],
            &mut NoBlocking,
        )
        .unwrap();
    for step in 0..steps {
        if step == steps / 2 {
            midway();
        }
        let (mut obs, mut actions, mut rewards) = (Vec::new(), Vec::new(), Vec::new());
        let (mut terminated, mut truncated) = (Vec::new(), Vec::new());
        for e in 0..envs {
            let (ep, pos, ended) = at[e as usize];
            let (frame, term, trunc) = if ended {
                at[e as usize] = (ep + 1, 0, false);
                ([id, e, ep + 1, 0], false, false)
            } else {
                let (len, terminates) = episode(id, e, ep);
                let next = pos + 1;
                let end = next == len;
                at[e as usize] = (ep, next, end);
                ([id, e, ep, next], end && terminates, end && !terminates)
            };
            let previous = [id, e, frame[2], frame[3].saturating_sub(1)];
            obs.extend(frame.iter().flat_map(|v| v.to_ne_bytes()));
            actions.extend(action(previous).to_ne_bytes());
            rewards.extend(reward(previous).to_ne_bytes());
            terminated.push(term);
            truncated.push(trunc);
        }
        buffer
            .step(
                &mut writer,
                &[
                    InColumn::from_slice(&obs),
                    InColumn::from_slice(&actions),
                    InColumn::from_slice(&rewards),
                ],
                &terminated,
                &truncated,
                None,
                &mut NoBlocking,
            )
            .unwrap();
    }
}

fn frames(bytes: &[u8]) -> Vec<[u32; 4]> {
    bytes
        .chunks_exact(16)
        .map(|c| {
            std::array::from_fn(|i| u32::from_ne_bytes(c[i * 4..i * 4 + 4].try_into().unwrap()))
        })
        .collect()
}

/// The stack of `stack` frames ending at position `end` of the episode of `frame`.
fn expected_stack(frame: [u32; 4], end: u32, stack: u32, padding: Padding) -> Vec<[u32; 4]> {
    (0..stack)
        .map(|s| match (end + s + 1).checked_sub(stack) {
            Some(p) => [frame[0], frame[1], frame[2], p],
            None if padding == Padding::First => [frame[0], frame[1], frame[2], 0],
            None => [0; 4],
        })
        .collect()
}

/// Samples `batches` batches of steps and checks every item; returns how many were checked,
/// a count it also publishes in `progress` after every batch.
fn check_steps(
    buffer: &EpisodeBuffer,
    batches: usize,
    stop: Option<&AtomicBool>,
    progress: &AtomicUsize,
) -> usize {
    let e = buffer.episodes();
    let (stack, n_step) = (e.frame_stack, e.n_step);
    let b = 16;
    let mut checked = 0;
    for _ in 0..batches {
        if stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
            break;
        }
        let mut obs = vec![0u8; b * stack * 16];
        let mut next = vec![0u8; b * stack * 16];
        let mut actions = vec![0u8; b * 8];
        let mut rewards = vec![0u8; b * 4];
        let (mut discount, mut terminated, mut truncated) =
            (vec![0u8; b * 4], vec![0u8; b], vec![0u8; b]);
        let (mut index, mut key) = (vec![0u64; b], vec![0u64; b]);
        let out = StepColumns {
            fields: vec![
                OutColumn::from_slice(&mut obs),
                OutColumn::from_slice(&mut actions),
                OutColumn::from_slice(&mut rewards),
            ],
            next: vec![OutColumn::from_slice(&mut next)],
            discount: OutColumn::from_slice(&mut discount),
            terminated: OutColumn::from_slice(&mut terminated),
            truncated: OutColumn::from_slice(&mut truncated),
        };
        match buffer.sample_columns(&out, &mut index, &mut key, None, &mut NoBlocking) {
            Err(Error::Empty) => continue,
            other => other.unwrap(),
        }
        drop(out);
        let obs = frames(&obs);
        let next = frames(&next);
        for row in 0..b {
            let stack_rows = &obs[row * stack..(row + 1) * stack];
            let me = stack_rows[stack - 1];
            let t = me[3];
            let (len, terminates) = episode(me[0], me[1], me[2]);
            assert!(t < len, "step {t} of an episode of {len} steps");
            let k = (n_step as u32).min(len - t);
            assert_eq!(
                stack_rows,
                expected_stack(me, t, stack as u32, e.padding),
                "obs stack"
            );
            assert_eq!(
                &next[row * stack..(row + 1) * stack],
                expected_stack(me, t + k, stack as u32, e.padding),
                "next stack of {me:?}"
            );
            let a = i64::from_ne_bytes(actions[row * 8..row * 8 + 8].try_into().unwrap());
            assert_eq!(a, action(me));
            let mut total = 0.0f64;
            for j in 0..k {
                total += GAMMA.powi(j as i32) * reward([me[0], me[1], me[2], t + j]) as f64;
            }
            let r = f32::from_ne_bytes(rewards[row * 4..row * 4 + 4].try_into().unwrap());
            assert_eq!(r, total as f32, "n-step return of {me:?}");
            let d = f32::from_ne_bytes(discount[row * 4..row * 4 + 4].try_into().unwrap());
            assert_eq!(d, GAMMA.powi(k as i32) as f32);
            let ends = t + k == len;
            assert_eq!(
                terminated[row] == 1,
                ends && terminates,
                "terminated of {me:?}"
            );
            assert_eq!(
                truncated[row] == 1,
                ends && !terminates,
                "truncated of {me:?}"
            );
            checked += 1;
        }
        progress.store(checked, Ordering::Release);
    }
    checked
}

#[test]
fn every_sampled_step_matches_the_oracle_while_writers_wrap_the_ring() {
    for (stack, n_step, padding) in [
        (1, 1, Padding::First),
        (4, 3, Padding::First),
        (4, 5, Padding::Zeros),
    ] {
        let name = shmreplay_core::unique_name();
        let buffer = Arc::new(buffer(&name, 300, stack, n_step, padding));
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(AtomicUsize::new(0));
        // The sampler starts first and samples until the writers are done; the writers wait
        // half-way until it has checked some items, so it always samples while they write
        // (and the ring has wrapped by then: 3 writers x 4 envs x 1500 steps >> 300 slots).
        let sampler = {
            let (buffer, stop, progress) = (
                Arc::clone(&buffer),
                Arc::clone(&stop),
                Arc::clone(&progress),
            );
            std::thread::spawn(move || check_steps(&buffer, usize::MAX, Some(&stop), &progress))
        };
        let writers: Vec<_> = (0..3)
            .map(|id| {
                let (buffer, progress) = (Arc::clone(&buffer), Arc::clone(&progress));
                std::thread::spawn(move || {
                    write(&buffer, id, 4, 3000, || {
                        let deadline = Instant::now() + Duration::from_secs(60);
                        while progress.load(Ordering::Acquire) < 64 {
                            assert!(Instant::now() < deadline, "the sampler checked nothing");
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    })
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        let during = sampler.join().unwrap();
        let after = check_steps(&buffer, 200, None, &AtomicUsize::new(0));
        assert!(after == 200 * 16, "{after} items checked after the writers");
        assert!(
            during >= 64,
            "{during} items checked while the writers wrote"
        );
        buffer.ring().unlink().unwrap();
    }
}

#[test]
fn sequences_match_the_oracle() {
    let name = shmreplay_core::unique_name();
    let buffer = buffer(&name, 2000, 2, 1, Padding::Zeros);
    write(&buffer, 0, 3, 300, || {});
    let (b, length, period) = (32usize, 5usize, 2usize);
    let stack = 2;
    let mut obs = vec![0u8; b * (length + 1) * stack * 16];
    let mut actions = vec![0u8; b * length * 8];
    let mut rewards = vec![0u8; b * length * 4];
    let mut flags: Vec<Vec<u8>> = (0..4).map(|_| vec![0u8; b * length]).collect();
    let (mut index, mut key) = (vec![0u64; b], vec![0u64; b]);
    let [terminated, truncated, is_first, mask] = &mut flags[..] else {
        unreachable!()
    };
    let out = SequenceColumns {
        fields: vec![
            OutColumn::from_slice(&mut obs),
            OutColumn::from_slice(&mut actions),
            OutColumn::from_slice(&mut rewards),
        ],
        terminated: OutColumn::from_slice(terminated),
        truncated: OutColumn::from_slice(truncated),
        is_first: OutColumn::from_slice(is_first),
        mask: OutColumn::from_slice(mask),
    };
    buffer
        .sample_sequences(
            &out,
            length,
            period,
            &mut index,
            &mut key,
            None,
            &mut NoBlocking,
        )
        .unwrap();
    drop(out);
    let obs = frames(&obs);
    for row in 0..b {
        let positions = &obs[row * (length + 1) * stack..(row + 1) * (length + 1) * stack];
        let start = positions[stack - 1]; // the stack of o_s ends at o_s
        let s = start[3];
        assert_eq!(s % period as u32, 0, "start {start:?}");
        let (len, terminates) = episode(start[0], start[1], start[2]);
        for p in 0..=length as u32 {
            let got = &positions[p as usize * stack..(p as usize + 1) * stack];
            if s + p <= len {
                assert_eq!(
                    got,
                    expected_stack(start, s + p, stack as u32, Padding::Zeros)
                );
            } else {
                assert!(got.iter().all(|f| *f == [0; 4]), "padding after the end");
            }
        }
        for p in 0..length as u32 {
            let at = row * length + p as usize;
            let real = s + p < len;
            assert_eq!(mask[at] == 1, real);
            assert_eq!(is_first[at] == 1, real && s + p == 0);
            let frame = [start[0], start[1], start[2], s + p];
            let a = i64::from_ne_bytes(actions[at * 8..at * 8 + 8].try_into().unwrap());
            assert_eq!(a, if real { action(frame) } else { 0 });
            let last = real && s + p + 1 == len;
            assert_eq!(terminated[at] == 1, last && terminates);
            assert_eq!(truncated[at] == 1, last && !terminates);
        }
    }
    buffer.ring().unlink().unwrap();
}

#[test]
fn incomplete_windows_are_not_drawn_and_an_empty_buffer_says_so() {
    let name = shmreplay_core::unique_name();
    let buffer = buffer(&name, 100, 1, 3, Padding::First);
    let mut writer = buffer.writer(1).unwrap();
    let frame = |t: u32| -> Vec<u8> {
        [9, 0, 0, t]
            .iter()
            .flat_map(|v: &u32| v.to_ne_bytes())
            .collect()
    };
    let step = |w: &mut EpisodeWriter, t: u32, end: bool| {
        let (a, r) = (0i64.to_ne_bytes(), 1f32.to_ne_bytes());
        buffer
            .step(
                w,
                &[
                    InColumn::from_slice(&frame(t)),
                    InColumn::from_slice(&a),
                    InColumn::from_slice(&r),
                ],
                &[end],
                &[false],
                None,
                &mut NoBlocking,
            )
            .unwrap();
    };
    assert!(matches!(
        buffer.step(&mut writer, &[], &[false], &[false], None, &mut NoBlocking),
        Err(Error::InvalidArgument(_))
    ));
    buffer
        .reset(
            &mut writer,
            &[0],
            &[InColumn::from_slice(&frame(0))],
            &mut NoBlocking,
        )
        .unwrap();
    step(&mut writer, 1, false);
    step(&mut writer, 2, false);
    let sample = |n: usize| {
        let (mut obs, mut next, mut a, mut r) = (
            vec![0u8; n * 16],
            vec![0u8; n * 16],
            vec![0u8; n * 8],
            vec![0u8; n * 4],
        );
        let (mut d, mut te, mut tr) = (vec![0u8; n * 4], vec![0u8; n], vec![0u8; n]);
        let (mut index, mut key) = (vec![0u64; n], vec![0u64; n]);
        let out = StepColumns {
            fields: vec![
                OutColumn::from_slice(&mut obs),
                OutColumn::from_slice(&mut a),
                OutColumn::from_slice(&mut r),
            ],
            next: vec![OutColumn::from_slice(&mut next)],
            discount: OutColumn::from_slice(&mut d),
            terminated: OutColumn::from_slice(&mut te),
            truncated: OutColumn::from_slice(&mut tr),
        };
        buffer
            .sample_columns(&out, &mut index, &mut key, None, &mut NoBlocking)
            .map(|()| frames(&obs))
    };
    // Two steps written, neither has its 3 steps: nothing to draw.
    assert!(matches!(sample(4), Err(Error::Empty)));
    step(&mut writer, 3, false);
    // Step 0's window (steps 0, 1, 2) is complete: only it is drawn.
    assert!(sample(64).unwrap().iter().all(|f| f[3] == 0));
    step(&mut writer, 4, true);
    // The episode ended: every step is complete.
    let drawn = sample(256).unwrap();
    for t in 0..4 {
        assert!(drawn.iter().any(|f| f[3] == t), "step {t} never drawn");
    }
    buffer.ring().unlink().unwrap();
}
