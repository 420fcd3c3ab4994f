//! Sampling episode streams: steps with frame stacks and n-step returns, and sequences.
//!
//! A draw picks a step's slot (uniformly, or by priority: a step's leaf stays 0 until its
//! window completes), walks its episode forwards through the links and backwards through
//! `prev` to every frame the item needs, copies, and then validates every one of those slots
//! with the version it read first. Steps whose window is incomplete, first frames, and steps
//! whose frames were overwritten are skipped; a slot that changed while it was read is a miss.

use super::{EpisodeBuffer, POSITION_MASK, TERMINATED, TRUNCATED};
use crate::buffer::sampler::{Drawn, Rows};
use crate::buffer::{Blocking, OutColumn, PriorityOutputs};
use crate::error::{Error, Result};
use crate::layout::schema::DType;
use crate::layout::{Flow, Padding, STAGED_RECORD_BYTES};
use crate::protocol::{episode, slot};

/// Where [`EpisodeBuffer::sample_columns`] puts a batch of `B` steps.
pub struct StepColumns<'a> {
    /// One per field, in field order: an observation field takes a stack of `frame_stack`
    /// frames ending at `o_t` per row, the reward field the n-step return
    /// `sum_{j<k} gamma^j r_{t+j}` (its own dtype), any other field its value at step `t`.
    pub fields: Vec<OutColumn<'a>>,
    /// One per observation field, in field order: the stack ending at `o_{t+k}`.
    pub next: Vec<OutColumn<'a>>,
    /// `gamma^k`, float32.
    pub discount: OutColumn<'a>,
    /// Whether the episode terminated / was truncated at the window's last step (bool bytes).
    pub terminated: OutColumn<'a>,
    pub truncated: OutColumn<'a>,
}

/// Where [`EpisodeBuffer::sample_sequences`] puts a batch of `B` sequences of `length` steps.
pub struct SequenceColumns<'a> {
    /// One per field, in field order: an observation field takes `length + 1` positions per
    /// row (each a stack of `frame_stack` frames), any other field (the reward too, raw)
    /// `length` values. Zeros after the episode's end.
    pub fields: Vec<OutColumn<'a>>,
    /// `length` bool bytes per row each.
    pub terminated: OutColumn<'a>,
    pub truncated: OutColumn<'a>,
    pub is_first: OutColumn<'a>,
    /// True for steps of the episode, false for the padding after its end.
    pub mask: OutColumn<'a>,
}

/// One frame as read, before validation: its slot, the version word it was read under, and
/// its metadata.
#[derive(Clone, Copy, Debug)]
struct Frame {
    ticket: u64,
    index: usize,
    begun: u64,
    prev: u64,
    step: u64,
}

impl Frame {
    fn position(&self) -> u64 {
        self.step & POSITION_MASK
    }

    fn terminated(&self) -> bool {
        self.step & TERMINATED != 0
    }

    fn truncated(&self) -> bool {
        self.step & TRUNCATED != 0
    }

    fn ended(&self) -> bool {
        self.terminated() || self.truncated()
    }
}

/// The frames of one item, in episode order: `chain[i]` is at position `first + i`; the
/// step's own frame (`o_{t+1}`, or `o_{s+1}` of a sequence) at `home`.
struct Window {
    chain: Vec<Frame>,
    first: u64,
    home: usize,
}

impl Window {
    fn at(&self, position: u64) -> &Frame {
        &self.chain[(position - self.first) as usize]
    }

    /// Frames from the home frame on (the steps of the window).
    fn steps(&self) -> &[Frame] {
        &self.chain[self.home..]
    }
}

enum Shape<'o, 'a> {
    Steps(&'o StepColumns<'a>),
    Sequences {
        out: &'o SequenceColumns<'a>,
        length: usize,
        period: u64,
    },
}

/// Where a window lacks a frame.
enum Missing {
    Before,
    After,
}

/// The episode buffer's [`Rows`]: items read from the slots the ring's samplers draw.
struct Items<'b, 'o, 'a> {
    buffer: &'b EpisodeBuffer,
    shape: Shape<'o, 'a>,
    zeros: Vec<u8>,
}

impl EpisodeBuffer {
    /// Draws `index.len()` steps whose n-step window is complete (uniformly, or by priority
    /// when `priority` holds the outputs of a prioritized buffer's draws and `beta`), each
    /// with its frame stacks and n-step return, into `out`; `index` and `key` get the slot
    /// and ticket of each step's `o_{t+1}` frame (the key `update_priorities` takes).
    /// [`Error::Empty`] if no step is complete (without a limiter).
    pub fn sample_columns(
        &self,
        out: &StepColumns<'_>,
        index: &mut [u64],
        key: &mut [u64],
        priority: Option<(PriorityOutputs<'_>, f64)>,
        blocking: &mut dyn Blocking,
    ) -> Result<()> {
        let n = index.len();
        let fields = self.fields();
        let stack = self.spec.frame_stack;
        let observations = (0..fields.len()).filter(|&i| self.spec.is_observation(i));
        if out.fields.len() != fields.len() || out.next.len() != observations.clone().count() {
            return Err(Error::InvalidArgument(format!(
                "sample takes {} field columns and {} next columns",
                fields.len(),
                observations.count()
            )));
        }
        let mut expected: Vec<(&str, &OutColumn<'_>, usize)> = Vec::new();
        for (i, (f, column)) in fields.iter().zip(&out.fields).enumerate() {
            let per_row = if self.spec.is_observation(i) {
                stack * f.bytes
            } else {
                f.bytes
            };
            expected.push((&f.name, column, per_row));
        }
        for (i, column) in observations.zip(&out.next) {
            expected.push((&fields[i].name, column, stack * fields[i].bytes));
        }
        expected.push(("discount", &out.discount, 4));
        expected.push(("terminated", &out.terminated, 1));
        expected.push(("truncated", &out.truncated, 1));
        check_rows(&expected, n, key.len())?;
        let items = Items {
            buffer: self,
            shape: Shape::Steps(out),
            zeros: self.zeros(),
        };
        self.draw(items, index, key, priority, blocking)
    }

    /// Draws `index.len()` sequences of `length` steps, each from one episode, starting at a
    /// step `s` with `s % period == 0` (counted from the episode's start) whose `length`
    /// steps are written or whose episode ended before; see [`SequenceColumns`]. By priority,
    /// a sequence is drawn by its first step's. `index`/`key`: the first step's.
    #[allow(clippy::too_many_arguments)]
    pub fn sample_sequences(
        &self,
        out: &SequenceColumns<'_>,
        length: usize,
        period: usize,
        index: &mut [u64],
        key: &mut [u64],
        priority: Option<(PriorityOutputs<'_>, f64)>,
        blocking: &mut dyn Blocking,
    ) -> Result<()> {
        if length < 1 || period < 1 {
            return Err(Error::InvalidArgument(format!(
                "length and period must be at least 1, got {length} and {period}"
            )));
        }
        let n = index.len();
        let fields = self.fields();
        if out.fields.len() != fields.len() {
            return Err(Error::InvalidArgument(format!(
                "sample_sequences takes {} field columns",
                fields.len()
            )));
        }
        let mut expected: Vec<(&str, &OutColumn<'_>, usize)> = Vec::new();
        for (i, (f, column)) in fields.iter().zip(&out.fields).enumerate() {
            let per_row = if self.spec.is_observation(i) {
                (length + 1) * self.spec.frame_stack * f.bytes
            } else {
                length * f.bytes
            };
            expected.push((&f.name, column, per_row));
        }
        expected.push(("terminated", &out.terminated, length));
        expected.push(("truncated", &out.truncated, length));
        expected.push(("is_first", &out.is_first, length));
        expected.push(("mask", &out.mask, length));
        check_rows(&expected, n, key.len())?;
        let items = Items {
            buffer: self,
            shape: Shape::Sequences {
                out,
                length,
                period: period as u64,
            },
            zeros: self.zeros(),
        };
        self.draw(items, index, key, priority, blocking)
    }

    fn draw(
        &self,
        mut items: Items<'_, '_, '_>,
        index: &mut [u64],
        key: &mut [u64],
        priority: Option<(PriorityOutputs<'_>, f64)>,
        blocking: &mut dyn Blocking,
    ) -> Result<()> {
        match priority {
            Some((info, beta)) => self
                .ring
                .draw_prioritized(&mut items, index, key, info, beta, blocking),
            None => {
                if index.is_empty() {
                    return Ok(());
                }
                if let Flow::Limited(_) = self.ring.flow() {
                    self.ring.admit_sample(index.len() as u64, blocking)?;
                }
                self.ring
                    .draw_uniform_rows(&mut items, index, key, blocking)
            }
        }
    }

    /// Zeros for the padding: as many as the largest field's value.
    fn zeros(&self) -> Vec<u8> {
        vec![0u8; self.fields().iter().map(|f| f.bytes).max().unwrap_or(0)]
    }

    // ---- frames ----

    /// The frame slot `index` holds, if committed.
    fn frame_at(&self, index: usize) -> Option<Frame> {
        let begun = slot::read_begin(self.ring.seq(index))?;
        let (prev, step) = self.metadata(index);
        Some(Frame {
            ticket: slot::ticket_of(begun),
            index,
            begun,
            prev,
            step,
        })
    }

    /// Frame `ticket`, if its slot still holds it.
    fn frame(&self, ticket: u64) -> Option<Frame> {
        let frame = self.frame_at((ticket % self.ring.capacity()) as usize)?;
        (frame.ticket == ticket).then_some(frame)
    }

    /// The episode's frame after `frame`, if it is linked and still held.
    fn next(&self, frame: &Frame) -> Option<Frame> {
        let ticket = episode::linked(self.link(frame.index), frame.ticket)?;
        let next = self.frame(ticket)?;
        (episode::follows(next.prev, frame.ticket) && next.position() == frame.position() + 1)
            .then_some(next)
    }

    /// The episode's frame before `frame`, if it has one and it is still held.
    fn prev(&self, frame: &Frame) -> Option<Frame> {
        let ticket = frame.prev.checked_sub(1)?;
        let prev = self.frame(ticket)?;
        (prev.position() + 1 == frame.position()).then_some(prev)
    }

    /// `(prev, step)` of slot `index`, read with the kernels that wrote them.
    fn metadata(&self, index: usize) -> (u64, u64) {
        let mut words = [0u8; 16];
        let out = OutColumn::from_slice(&mut words);
        self.copy_field(index, self.prev_field, &out, 0);
        self.copy_field(index, self.step_field, &out, 8);
        let word = |i: usize| u64::from_ne_bytes(words[i * 8..i * 8 + 8].try_into().unwrap());
        (word(0), word(1))
    }

    /// Copies field `field` of slot `index` into `dst` at byte `at` (unvalidated).
    fn copy_field(&self, index: usize, field: usize, dst: &OutColumn<'_>, at: usize) {
        let ring = &self.ring;
        let f = &ring.schema.fields()[field];
        let record = ring.record_offset(index);
        if ring.layout.staged() {
            // Small records are written whole with one kernel: read them the same way.
            let mut staged = [0u8; STAGED_RECORD_BYTES];
            let staged = &mut staged[..ring.layout.record_bytes];
            ring.segment
                .load_bytes(record, staged, ring.copy.record.load);
            dst.write(at, &staged[f.offset..f.offset + f.bytes]);
        } else {
            ring.segment.load_to(
                record + f.offset,
                dst,
                at,
                f.bytes,
                ring.copy.fields[field].load,
            );
        }
    }

    /// The reward of the step that led to frame `frame` (unvalidated).
    fn reward(&self, frame: &Frame, field: usize) -> f64 {
        let mut bytes = [0u8; 8];
        let len = self.ring.schema.fields()[field].bytes;
        self.copy_field(
            frame.index,
            field,
            &OutColumn::from_slice(&mut bytes[..len]),
            0,
        );
        match self.ring.schema.fields()[field].dtype {
            DType::F32 => f32::from_ne_bytes(bytes[..4].try_into().unwrap()) as f64,
            _ => f64::from_ne_bytes(bytes),
        }
    }

    /// The window of the item whose step frame is `home`: `ahead` steps from it (fewer if the
    /// episode ends first) and the `behind` frames before it (fewer at the episode's start),
    /// or which side has a frame missing: before it (overwritten: for good), or after it (not
    /// linked yet, or overwritten).
    fn window(
        &self,
        home: Frame,
        ahead: usize,
        behind: u64,
    ) -> std::result::Result<Window, Missing> {
        // (`ahead` may be a huge sequence length; the chain grows only as far as frames exist.)
        let mut chain = Vec::with_capacity(ahead.min(64) + behind as usize + 1);
        let first = home.position().saturating_sub(behind);
        let mut frame = home;
        while frame.position() > first {
            frame = self.prev(&frame).ok_or(Missing::Before)?;
            chain.push(frame);
        }
        chain.reverse();
        let home_at = chain.len();
        chain.push(home);
        let mut last = home;
        while chain.len() - home_at < ahead && !last.ended() {
            last = self.next(&last).ok_or(Missing::After)?;
            chain.push(last);
        }
        Ok(Window {
            chain,
            first,
            home: home_at,
        })
    }

    /// Whether every frame of `window` still holds what was read.
    fn still_valid(&self, window: &Window) -> bool {
        window
            .chain
            .iter()
            .all(|f| slot::read_validate(self.ring.seq(f.index), f.begun))
    }

    /// Copies into `dst` from byte `at` the stack of `frame_stack` frames of field `field`
    /// ending at position `end` of `window`.
    fn copy_stack(
        &self,
        window: &Window,
        end: u64,
        field: usize,
        dst: &OutColumn<'_>,
        at: usize,
        zeros: &[u8],
    ) {
        let bytes = self.ring.schema.fields()[field].bytes;
        let stack = self.spec.frame_stack as u64;
        for s in 0..stack {
            let at = at + s as usize * bytes;
            match (end + s + 1).checked_sub(stack) {
                Some(position) => self.copy_field(window.at(position).index, field, dst, at),
                None => match self.spec.padding {
                    Padding::First => self.copy_field(window.at(0).index, field, dst, at),
                    Padding::Zeros => dst.write(at, &zeros[..bytes]),
                },
            }
        }
    }
}

impl Items<'_, '_, '_> {
    /// The window of the item at slot `index`, or why there is none.
    fn plan(&self, index: usize) -> std::result::Result<Window, Drawn> {
        let buffer = self.buffer;
        let home = buffer.frame_at(index).ok_or(Drawn::Miss)?;
        if home.position() == 0 {
            return Err(Drawn::Skip); // an episode's first frame: no step leads to it
        }
        let behind = buffer.spec.frame_stack as u64; // o_t and the frames of its stack
        let ahead = match self.shape {
            Shape::Steps(_) => buffer.spec.n_step,
            Shape::Sequences { length, period, .. } => {
                if (home.position() - 1) % period != 0 {
                    return Err(Drawn::Skip);
                }
                length
            }
        };
        buffer
            .window(home, ahead, behind)
            .map_err(|missing| match (missing, &self.shape) {
                // Frames before a step never come back: it is gone (by priority: its mass
                // too). Frames after it may be on their way (or its slot was just reused).
                (Missing::Before, Shape::Steps(_)) => Drawn::Gone(home.ticket),
                _ => Drawn::Skip,
            })
    }

    fn copy_step(&self, out: &StepColumns<'_>, window: &Window, row: usize) {
        let buffer = self.buffer;
        let spec = &buffer.spec;
        let steps = window.steps();
        let home = steps[0];
        let last = steps[steps.len() - 1];
        let k = steps.len();
        let t = home.position() - 1;
        let stack = spec.frame_stack;
        let mut next = out.next.iter();
        for (i, (f, column)) in buffer.fields().iter().zip(&out.fields).enumerate() {
            if spec.is_observation(i) {
                let at = row * stack * f.bytes;
                buffer.copy_stack(window, t, i, column, at, &self.zeros);
                let next = next.next().expect("one next column per observation");
                buffer.copy_stack(window, last.position(), i, next, at, &self.zeros);
            } else if spec.reward == Some(i) {
                let mut discount = 1.0;
                let mut total = 0.0;
                for frame in steps {
                    total += discount * buffer.reward(frame, i);
                    discount *= spec.gamma;
                }
                match f.dtype {
                    DType::F32 => column.write(row * 4, &(total as f32).to_ne_bytes()),
                    _ => column.write(row * 8, &total.to_ne_bytes()),
                }
            } else {
                buffer.copy_field(home.index, i, column, row * f.bytes);
            }
        }
        let discount = spec.gamma.powi(k as i32) as f32;
        out.discount.write(row * 4, &discount.to_ne_bytes());
        out.terminated.write(row, &[u8::from(last.terminated())]);
        out.truncated.write(row, &[u8::from(last.truncated())]);
    }

    fn copy_sequence(&self, out: &SequenceColumns<'_>, length: usize, window: &Window, row: usize) {
        let buffer = self.buffer;
        let spec = &buffer.spec;
        let steps = window.steps();
        let s = steps[0].position() - 1;
        let stack = spec.frame_stack;
        for (i, (f, column)) in buffer.fields().iter().zip(&out.fields).enumerate() {
            if spec.is_observation(i) {
                let per_position = stack * f.bytes;
                for p in 0..=length {
                    let at = (row * (length + 1) + p) * per_position;
                    if p <= steps.len() {
                        buffer.copy_stack(window, s + p as u64, i, column, at, &self.zeros);
                    } else {
                        for z in 0..stack {
                            column.write(at + z * f.bytes, &self.zeros[..f.bytes]);
                        }
                    }
                }
            } else {
                for p in 0..length {
                    let at = (row * length + p) * f.bytes;
                    match steps.get(p) {
                        Some(frame) => buffer.copy_field(frame.index, i, column, at),
                        None => column.write(at, &self.zeros[..f.bytes]),
                    }
                }
            }
        }
        for p in 0..length {
            let frame = steps.get(p);
            let at = row * length + p;
            out.terminated
                .write(at, &[u8::from(frame.is_some_and(Frame::terminated))]);
            out.truncated
                .write(at, &[u8::from(frame.is_some_and(Frame::truncated))]);
            out.is_first
                .write(at, &[u8::from(frame.is_some() && s + p as u64 == 0)]);
            out.mask.write(at, &[u8::from(frame.is_some())]);
        }
    }
}

impl Rows for Items<'_, '_, '_> {
    fn read(&mut self, index: usize, row: usize) -> Drawn {
        let window = match self.plan(index) {
            Ok(window) => window,
            Err(drawn) => return drawn,
        };
        match self.shape {
            Shape::Steps(out) => self.copy_step(out, &window, row),
            Shape::Sequences { out, length, .. } => self.copy_sequence(out, length, &window, row),
        }
        if self.buffer.still_valid(&window) {
            Drawn::Item(window.steps()[0].ticket)
        } else {
            Drawn::Miss
        }
    }

    fn any(&mut self, claimed: u64) -> bool {
        (0..claimed as usize).any(|index| self.plan(index).is_ok())
    }

    fn stratifiable(&self) -> bool {
        // Most draws of sequences are skipped (their start is not at a period's step).
        matches!(self.shape, Shape::Steps(_))
    }
}

/// Checks that each output holds `n` rows of its size, and `key` `n` entries.
fn check_rows(expected: &[(&str, &OutColumn<'_>, usize)], n: usize, keys: usize) -> Result<()> {
    if keys != n {
        return Err(Error::InvalidArgument(format!(
            "key has {keys} rows, index has {n}"
        )));
    }
    for &(name, column, per_row) in expected {
        if column.len() != n * per_row {
            return Err(Error::InvalidArgument(format!(
                "output {name:?} holds {} bytes, {n} rows need {}",
                column.len(),
                n * per_row
            )));
        }
    }
    Ok(())
}
