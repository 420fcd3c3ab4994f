//! Property test: single-process ring semantics match a plain model (a Vec of the last value
//! written to each slot), for any sequence of extends, reads and samples.

use proptest::prelude::*;
use shmreplay_core::{DType, ReplayBuffer, Schema};

#[derive(Clone, Debug)]
enum Op {
    Extend(Vec<u64>),
    Read(u64),
    Sample(usize),
}

fn op(capacity: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        prop::collection::vec(any::<u64>(), 0..(3 * capacity as usize)).prop_map(Op::Extend),
        (0..capacity).prop_map(Op::Read),
        (1usize..20).prop_map(Op::Sample),
    ]
}

/// Each record holds `value` and 3 bytes derived from it, so a mixed record is detectable.
fn tag(value: u64) -> [u8; 3] {
    let b = value.to_le_bytes();
    [b[0] ^ b[7], b[1] ^ b[6], b[2] ^ 0x5a]
}

fn schema() -> Schema {
    Schema::new(&[("value", DType::U64, vec![]), ("tag", DType::U8, vec![3])]).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn ring_matches_model((capacity, ops) in (1u64..12).prop_flat_map(|c| (Just(c), prop::collection::vec(op(c), 1..40)))) {
        let dir = std::env::temp_dir();
        let name = shmreplay_core::unique_name();
        let buffer = ReplayBuffer::create(&name, Some(&dir), capacity, schema()).unwrap();
        buffer.unlink().unwrap();
        // model[slot] = (ticket, value)
        let mut model: Vec<Option<(u64, u64)>> = vec![None; capacity as usize];
        let mut tickets = 0u64;
        for op in ops {
            match op {
                Op::Extend(values) => {
                    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                    let tags: Vec<u8> = values.iter().flat_map(|&v| tag(v)).collect();
                    prop_assert_eq!(buffer.extend(&[&bytes, &tags]).unwrap(), values.len());
                    for v in values {
                        model[(tickets % capacity) as usize] = Some((tickets, v));
                        tickets += 1;
                    }
                }
                Op::Read(slot) => {
                    let (mut value, mut t) = ([0u8; 8], [0u8; 3]);
                    let key = buffer.read(slot, &mut [&mut value, &mut t]).unwrap();
                    match model[slot as usize] {
                        None => prop_assert_eq!(key, None),
                        Some((ticket, v)) => {
                            prop_assert_eq!(key, Some(ticket));
                            prop_assert_eq!(u64::from_le_bytes(value), v);
                            prop_assert_eq!(t, tag(v));
                        }
                    }
                }
                Op::Sample(n) => {
                    let (mut values, mut tags) = (vec![0u8; 8 * n], vec![0u8; 3 * n]);
                    let (mut index, mut key) = (vec![0u64; n], vec![0u64; n]);
                    let result = buffer.sample_into(&mut [&mut values, &mut tags], &mut index, &mut key);
                    if tickets == 0 {
                        prop_assert!(matches!(result, Err(shmreplay_core::Error::Empty)));
                        continue;
                    }
                    result.unwrap();
                    for row in 0..n {
                        let (ticket, v) = model[index[row] as usize].expect("sampled a never-written slot");
                        prop_assert_eq!(key[row], ticket);
                        prop_assert_eq!(key[row] % capacity, index[row]);
                        let got = u64::from_le_bytes(values[8 * row..8 * row + 8].try_into().unwrap());
                        prop_assert_eq!(got, v);
                        prop_assert_eq!(&tags[3 * row..3 * row + 3], &tag(v)[..]);
                    }
                }
            }
            prop_assert_eq!(buffer.len(), tickets.min(capacity));
            let stats = buffer.stats();
            prop_assert_eq!(stats.inserts + stats.superseded, tickets);
        }
    }
}

#[test]
fn bad_input_writes_nothing() {
    let dir = std::env::temp_dir();
    let name = shmreplay_core::unique_name();
    let buffer = ReplayBuffer::create(&name, Some(&dir), 4, schema()).unwrap();
    buffer.unlink().unwrap();
    let cases: [&[&[u8]]; 3] = [
        &[&[0u8; 8]],             // a field missing
        &[&[0u8; 16], &[0u8; 3]], // 2 rows vs 1 row
        &[&[0u8; 7], &[0u8; 3]],  // not a whole value
    ];
    for columns in cases {
        assert!(buffer.extend(columns).is_err());
    }
    assert_eq!(buffer.len(), 0);
    assert_eq!(buffer.stats().inserts, 0);
    let mut out = [0u8; 8];
    assert!(buffer.read(4, &mut [&mut out, &mut [0u8; 3]]).is_err());
}
