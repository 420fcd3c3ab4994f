//! Writing episode streams: one [`EpisodeWriter`] per vector env, private to its process.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use super::{step_word, EpisodeBuffer};
use crate::buffer::{Blocking, InColumn, Leaves, NoBlocking};
use crate::error::{Error, Result};
use crate::protocol::{episode, slot};

/// Tickets never reach this (`slot::MAX_TICKET` is far below): a row not written.
const UNWRITTEN: u64 = u64::MAX;

/// The state of the streams of one vector env (one per env): where each env's episode is.
/// Private to the process that writes; pass it to [`EpisodeBuffer::reset`] and
/// [`EpisodeBuffer::step`].
#[derive(Debug, Clone)]
pub struct EpisodeWriter {
    streams: Vec<Stream>,
}

#[derive(Debug, Clone, Default)]
struct Stream {
    state: State,
    /// Ticket of the episode's last frame.
    last: u64,
    /// Position of that frame in its episode.
    position: u64,
    /// Steps (the tickets of their `o_{t+1}` frames) whose n-step window is not complete yet,
    /// oldest first, with the raw priority each was written with.
    pending: VecDeque<(u64, Option<f64>)>,
}

impl Stream {
    /// A stream whose new episode's first frame is `ticket`.
    fn started(ticket: u64) -> Stream {
        Stream {
            state: State::Running,
            last: ticket,
            position: 0,
            pending: VecDeque::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum State {
    /// Never reset: `step` refuses it.
    #[default]
    Fresh,
    /// In an episode: the next `step` continues it.
    Running,
    /// Its last step ended the episode: the next `step` starts a new one (autoreset).
    Ended,
    /// A frame of its episode was not written (its writer fell a lap behind, or a call failed
    /// part-way): the rest of the episode is stored unlinked, never an item, until it ends.
    Detached,
}

impl EpisodeWriter {
    /// A writer of `num_envs` streams.
    pub fn new(num_envs: usize) -> EpisodeWriter {
        EpisodeWriter {
            streams: vec![Stream::default(); num_envs],
        }
    }

    pub fn num_envs(&self) -> usize {
        self.streams.len()
    }
}

impl EpisodeBuffer {
    /// A writer of `num_envs` streams, refused if one step of them would not fit the ring.
    pub fn writer(&self, num_envs: usize) -> Result<EpisodeWriter> {
        if num_envs == 0 || num_envs as u64 > self.ring.capacity() {
            return Err(Error::InvalidArgument(format!(
                "num_envs must be between 1 and the capacity ({}), got {num_envs}",
                self.ring.capacity()
            )));
        }
        Ok(EpisodeWriter::new(num_envs))
    }

    /// Starts a new episode in each env of `envs` with its first observation: `columns` hold
    /// one row per listed env of every observation field, in field order. An env's unfinished
    /// episode is abandoned (its steps whose window is incomplete are never sampled). A call
    /// that writes nothing (refused, timed out) changes nothing. An env whose frame was not
    /// written (its writer fell a lap behind the ring, or the call failed part-way: do not
    /// retry that one) stores the rest of that episode unlinked, never an item.
    pub fn reset(
        &self,
        writer: &mut EpisodeWriter,
        envs: &[usize],
        columns: &[InColumn<'_>],
        blocking: &mut dyn Blocking,
    ) -> Result<()> {
        let n = envs.len();
        self.check_envs(writer, envs)?;
        let observations: Vec<usize> = (0..self.fields().len())
            .filter(|&i| self.spec.is_observation(i))
            .collect();
        if columns.len() != observations.len() {
            return Err(Error::InvalidArgument(format!(
                "reset takes {} observation columns, got {}",
                observations.len(),
                columns.len()
            )));
        }
        let fields = self.ring.schema().fields();
        for (&i, column) in observations.iter().zip(columns) {
            if column.len() != n * fields[i].bytes {
                return Err(Error::InvalidArgument(format!(
                    "observation {:?}: {} bytes for {n} envs, expected {}",
                    fields[i].name,
                    column.len(),
                    n * fields[i].bytes
                )));
            }
        }
        if n == 0 {
            return Ok(());
        }
        // Other fields are zeros in a first frame; the metadata says "position 0, no prev".
        let zeros: Vec<Vec<u8>> = fields[..self.prev_field]
            .iter()
            .enumerate()
            .filter(|&(i, _)| !self.spec.is_observation(i))
            .map(|(_, f)| vec![0u8; n * f.bytes])
            .collect();
        let metadata = vec![0u8; n * 8];
        let mut given = columns.iter();
        let mut zero = zeros.iter();
        let mut all: Vec<InColumn<'_>> = (0..self.prev_field)
            .map(|i| {
                if self.spec.is_observation(i) {
                    *given.next().expect("one column per observation")
                } else {
                    InColumn::from_slice(zero.next().expect("one per other field"))
                }
            })
            .collect();
        all.extend([
            InColumn::from_slice(&metadata),
            InColumn::from_slice(&metadata),
        ]);
        let mut tickets = vec![UNWRITTEN; n];
        let result = self.insert_frames(&all, &mut tickets, blocking);
        if result.is_err() && tickets.iter().all(|&t| t == UNWRITTEN) {
            return result; // refused or timed out, nothing written: nothing changes
        }
        for (&env, &ticket) in envs.iter().zip(&tickets) {
            let stream = &mut writer.streams[env];
            stream.pending.clear();
            if ticket == UNWRITTEN {
                // Its first frame is lost (superseded: this writer fell a lap behind).
                stream.state = State::Detached;
            } else {
                *stream = Stream::started(ticket);
            }
        }
        result
    }

    /// One step of every env: `columns` hold one row per env of every field (in field order),
    /// the frame `o_{t+1}` with the step's `a_t, r_t, …`. An env whose last step ended its
    /// episode starts a new one with this observation as `o_0` (its action, reward and flags
    /// are ignored: gymnasium's autoreset). `priorities`: the raw priority of each env's step
    /// (or one for all), applied when the step's n-step window completes; `None`, the largest
    /// raw priority so far (at least 1.0) at that time. Refused before anything is written if
    /// an env was never reset. A call that writes nothing (refused, timed out) changes nothing
    /// and can be retried; one that fails part-way (Ctrl-C, [`Error::Contended`]) wrote some
    /// envs' frames: do not retry it. An env whose frame was not written (that, or its writer
    /// fell a lap behind the ring and the frame was superseded) stores the rest of that
    /// episode unlinked, never an item, until the episode ends.
    pub fn step(
        &self,
        writer: &mut EpisodeWriter,
        columns: &[InColumn<'_>],
        terminated: &[bool],
        truncated: &[bool],
        priorities: Option<&[f64]>,
        blocking: &mut dyn Blocking,
    ) -> Result<()> {
        let n = writer.streams.len();
        let fields = self.fields();
        if columns.len() != fields.len() {
            return Err(Error::InvalidArgument(format!(
                "step takes {} columns (one per field), got {}",
                fields.len(),
                columns.len()
            )));
        }
        for (field, column) in fields.iter().zip(columns) {
            if column.len() != n * field.bytes {
                return Err(Error::InvalidArgument(format!(
                    "field {:?}: {} bytes for {n} envs, expected {}",
                    field.name,
                    column.len(),
                    n * field.bytes
                )));
            }
        }
        for (name, flags) in [("terminated", terminated), ("truncated", truncated)] {
            if flags.len() != n {
                return Err(Error::InvalidArgument(format!(
                    "{name} has {} values for {n} envs",
                    flags.len()
                )));
            }
        }
        let priorities: Vec<Option<f64>> = match priorities {
            None => vec![None; n],
            Some(p) => {
                // Validated as an insert's priorities (one per env or one for all).
                self.ring.row_priorities(Some(p), n)?;
                (0..n).map(|i| Some(p[i.min(p.len() - 1)])).collect()
            }
        };
        if let Some(env) = writer.streams.iter().position(|s| s.state == State::Fresh) {
            return Err(Error::InvalidArgument(format!(
                "step before reset for env {env}: call reset first"
            )));
        }
        let mut prev = Vec::with_capacity(n * 8);
        let mut step = Vec::with_capacity(n * 8);
        for (i, stream) in writer.streams.iter().enumerate() {
            let (p, s) = match stream.state {
                State::Running => (
                    episode::prev_word(Some(stream.last)),
                    step_word(stream.position + 1, terminated[i], truncated[i]),
                ),
                _ => (0, 0),
            };
            prev.extend_from_slice(&p.to_ne_bytes());
            step.extend_from_slice(&s.to_ne_bytes());
        }
        let mut all = columns.to_vec();
        all.extend([InColumn::from_slice(&prev), InColumn::from_slice(&step)]);
        let mut tickets = vec![UNWRITTEN; n];
        let result = self.insert_frames(&all, &mut tickets, blocking);
        if result.is_err() && tickets.iter().all(|&t| t == UNWRITTEN) {
            return result; // refused or timed out, nothing written: the call can be retried
        }
        let mut completed: Vec<(u64, Option<f64>)> = Vec::new();
        for (i, stream) in writer.streams.iter_mut().enumerate() {
            let ticket = tickets[i];
            let ends = terminated[i] || truncated[i];
            match (stream.state, ticket) {
                (state, UNWRITTEN) => {
                    // A frame lost (superseded, or a call failed part-way): the episode's
                    // windows can no longer complete. If the lost step ended it, the next step
                    // starts a new one; otherwise the rest of it is stored unlinked.
                    stream.pending.clear();
                    stream.state = match (state, ends) {
                        (State::Running | State::Detached, true) => State::Ended,
                        _ => State::Detached,
                    };
                }
                (State::Detached, _) => {
                    if ends {
                        stream.state = State::Ended;
                    }
                }
                (State::Running, _) => {
                    self.set_link(stream.last, ticket);
                    stream.last = ticket;
                    stream.position += 1;
                    stream.pending.push_back((ticket, priorities[i]));
                    if ends {
                        completed.extend(stream.pending.drain(..));
                        stream.state = State::Ended;
                    } else if stream.pending.len() >= self.spec.n_step {
                        completed.extend(stream.pending.pop_front());
                    }
                }
                (_, _) => {
                    *stream = Stream::started(ticket);
                }
            }
        }
        self.complete(&completed);
        result
    }

    fn check_envs(&self, writer: &EpisodeWriter, envs: &[usize]) -> Result<()> {
        let n = writer.streams.len();
        let mut seen = vec![false; n];
        for &env in envs {
            if env >= n {
                return Err(Error::InvalidArgument(format!(
                    "env {env} is out of range for {n} envs"
                )));
            }
            if std::mem::replace(&mut seen[env], true) {
                return Err(Error::InvalidArgument(format!("env {env} is listed twice")));
            }
        }
        Ok(())
    }

    /// Inserts frames: a prioritized ring's leaves stay 0 (never drawn) until their step's
    /// window completes.
    fn insert_frames(
        &self,
        columns: &[InColumn<'_>],
        tickets: &mut [u64],
        blocking: &mut dyn Blocking,
    ) -> Result<()> {
        self.ring
            .insert(columns, Leaves::Withheld, blocking, None, Some(tickets))
            .map(|_| ())
    }

    /// Links frame `from` to its successor `to` (both committed), unless `from`'s slot was
    /// overwritten meanwhile (see `protocol::episode::link`).
    fn set_link(&self, from: u64, to: u64) {
        let index = (from % self.ring.capacity()) as usize;
        episode::link(self.link(index), to, || {
            let word = self.ring.seq(index).load(Ordering::Acquire);
            slot::names_a_ticket(word) && !slot::is_busy(word) && slot::ticket_of(word) == from
        });
    }

    /// Steps whose window just completed: drawable by priority from now on.
    fn complete(&self, steps: &[(u64, Option<f64>)]) {
        let Some(tree) = self.ring.tree() else {
            return;
        };
        if steps.is_empty() {
            return;
        }
        let default = tree.max_raw();
        let keys: Vec<u64> = steps.iter().map(|&(k, _)| k).collect();
        let values: Vec<f64> = steps.iter().map(|&(_, p)| p.unwrap_or(default)).collect();
        // Validated when the step was written; a key overwritten since is skipped (not a stale
        // update of the user's).
        let _ = self
            .ring
            .set_priorities(&keys, &values, false, &mut NoBlocking);
    }
}
