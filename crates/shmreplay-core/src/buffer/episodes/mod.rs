//! Episode streams: many writers append the frames of their episodes into one ring, each frame
//! stored once; samplers rebuild frame stacks, n-step returns and sequences from them.
//!
//! A slot holds one frame: an episode's first observation `o_0` (written by `reset`), or
//! `o_{t+1}` with the step's other fields `a_t, r_t, …` and flags (written by `step`). Two
//! metadata fields end every record: `prev`, the ticket (+ 1) of the episode's previous frame
//! (0 for a first frame), and `step`, the frame's position in its episode and the step's
//! `terminated`/`truncated` flags. Step `t` of an episode is keyed by the slot of `o_{t+1}`.
//!
//! Frames of one episode are found backwards through `prev`, and forwards through the `links`
//! section: one word per slot, set by the episode's writer once the next frame is committed to
//! the ticket (+ 1) of that frame. A link is trusted only if the slot it names holds exactly
//! that ticket and its `prev` names the frame the link came from: tickets are never reused, so
//! a stale link (its slot overwritten since) never leads into another episode.
//!
//! A reader validates every slot of an item (stacks, the n steps, the bootstrap frame) with the
//! seqlock versions it read, after copying, and redraws if any changed (see `sampler`).
//! Eviction stays the ring's: oldest first over all writers.

mod sampler;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

pub use sampler::{SequenceColumns, StepColumns};
pub use writer::EpisodeWriter;

use super::{Builder, ReplayBuffer};
use crate::error::{Error, Result};
use crate::layout::schema::{DType, Schema};
use crate::layout::{EpisodeSpec, Limiter, Padding, Sampler};

/// The metadata fields that end every record of an episode buffer.
pub(crate) const PREV_FIELD: &str = "__episode_prev";
pub(crate) const STEP_FIELD: &str = "__episode_step";
/// Field names starting with this are the buffer's own.
const RESERVED_PREFIX: &str = "__episode";

/// `step` word: the frame's position in its episode (low bits) and the step's flags.
const POSITION_MASK: u64 = (1 << 48) - 1;
const TERMINATED: u64 = 1 << 62;
const TRUNCATED: u64 = 1 << 63;

/// Names the sample outputs use, which no field may take.
pub const RESERVED_NAMES: [&str; 8] = [
    "discount",
    "terminated",
    "truncated",
    "is_first",
    "mask",
    "priority",
    "timeout",
    "envs",
];

/// Refuses a schema whose last two fields are not the episode metadata.
pub(crate) fn check_metadata_fields(schema: &Schema) -> Result<()> {
    let fields = schema.fields();
    let ok = fields.len() >= 3
        && [PREV_FIELD, STEP_FIELD]
            .iter()
            .zip(&fields[fields.len() - 2..])
            .all(|(name, f)| f.name == *name && f.dtype == DType::U64 && f.shape.is_empty());
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidSchema(
            "the last two fields are not an episode buffer's metadata".into(),
        ))
    }
}

/// How an episode buffer turns frames into items (fixed at creation).
#[derive(Clone, Debug, PartialEq)]
pub struct Episodes {
    /// Fields stored once per frame and stacked when sampled.
    pub observations: Vec<String>,
    /// A scalar float field summed over `n_step` steps by [`EpisodeBuffer::sample_columns`].
    pub reward: Option<String>,
    /// Frames per stack (1: no stacking).
    pub frame_stack: usize,
    /// What stands in for frames before an episode's first.
    pub padding: Padding,
    /// Steps summed into a sample's return.
    pub n_step: usize,
    /// The discount of the n-step return, in `[0, 1]`.
    pub gamma: f64,
}

impl Default for Episodes {
    fn default() -> Self {
        Episodes {
            observations: vec!["obs".into()],
            reward: Some("reward".into()),
            frame_stack: 1,
            padding: Padding::First,
            n_step: 1,
            gamma: 0.99,
        }
    }
}

impl Episodes {
    /// The ring's schema (the user's fields and the metadata) and the spec stored in its header.
    fn resolve(&self, user: &Schema) -> Result<(Schema, EpisodeSpec)> {
        let bad = |why: String| Err(Error::InvalidArgument(why));
        let fields = user.fields();
        let index_of = |what: &str, name: &str| {
            fields.iter().position(|f| f.name == name).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{what} {name:?} is not one of the fields {:?}",
                    fields.iter().map(|f| &f.name).collect::<Vec<_>>()
                ))
            })
        };
        let mut observations = 0u64;
        for name in &self.observations {
            let i = index_of("observation", name)?;
            if i >= 64 {
                return bad(format!(
                    "observation {name:?} must be among the first 64 fields"
                ));
            }
            if observations >> i & 1 == 1 {
                return bad(format!("observation {name:?} is named twice"));
            }
            observations |= 1 << i;
        }
        let reward = match &self.reward {
            None => None,
            Some(name) => Some(index_of("reward", name)?),
        };
        for f in fields {
            let next_of_observation = f
                .name
                .strip_prefix("next_")
                .is_some_and(|base| self.observations.iter().any(|o| o == base));
            if f.name.starts_with(RESERVED_PREFIX)
                || RESERVED_NAMES.contains(&f.name.as_str())
                || next_of_observation
            {
                return bad(format!(
                    "field name {:?} is taken by the samples of an episode buffer (reserved: \
                     {RESERVED_NAMES:?}, next_<observation>, {RESERVED_PREFIX}*)",
                    f.name
                ));
            }
        }
        let mut all: Vec<(String, DType, Vec<usize>)> = fields
            .iter()
            .map(|f| (f.name.clone(), f.dtype, f.shape.clone()))
            .collect();
        all.push((PREV_FIELD.into(), DType::U64, vec![]));
        all.push((STEP_FIELD.into(), DType::U64, vec![]));
        let schema = Schema::new(&all)?;
        let spec = EpisodeSpec {
            observations,
            reward,
            frame_stack: self.frame_stack,
            padding: self.padding,
            n_step: self.n_step,
            gamma: self.gamma,
        };
        spec.validate(&schema)?;
        Ok((schema, spec))
    }
}

/// Options for creating or opening an episode buffer; see [`EpisodeBuffer::builder`].
#[derive(Clone, Debug)]
pub struct EpisodeBuilder {
    ring: Builder,
    episodes: Episodes,
}

impl EpisodeBuilder {
    /// The directory of the segment file (default `/dev/shm`).
    pub fn dir(mut self, dir: impl AsRef<Path>) -> EpisodeBuilder {
        self.ring = self.ring.dir(dir);
        self
    }

    /// The directory, if any (`None` keeps the default).
    pub fn dir_opt(mut self, dir: Option<&Path>) -> EpisodeBuilder {
        self.ring = self.ring.dir_opt(dir);
        self
    }

    /// Slots: frames held (steps and episode starts together; create only).
    pub fn capacity(mut self, capacity: u64) -> EpisodeBuilder {
        self.ring = self.ring.capacity(capacity);
        self
    }

    /// The fields of a step (create only); see [`Episodes`] for which play which part.
    pub fn schema(mut self, schema: Schema) -> EpisodeBuilder {
        self.ring = self.ring.schema(schema);
        self
    }

    /// Observation and reward fields, stacking, n-step return (create only).
    pub fn episodes(mut self, episodes: Episodes) -> EpisodeBuilder {
        self.episodes = episodes;
        self
    }

    /// [`Sampler::Uniform`] (the default) or [`Sampler::Prioritized`] (create only).
    pub fn sampler(mut self, sampler: Sampler) -> EpisodeBuilder {
        self.ring = self.ring.sampler(sampler);
        self
    }

    /// A rate limiter: inserts count frames, samples count items (create only).
    pub fn limiter(mut self, limiter: Option<Limiter>) -> EpisodeBuilder {
        self.ring = self.ring.limiter(limiter);
        self
    }

    /// Backs the segment with 2 MiB pages (create only); see [`Builder::huge_pages`].
    pub fn huge_pages(mut self, huge_pages: bool) -> EpisodeBuilder {
        self.ring = self.ring.huge_pages(huge_pages);
        self
    }

    /// Seeds the handle's random draws (create or open); see [`ReplayBuffer::reseed`].
    pub fn seed(mut self, seed: u64) -> EpisodeBuilder {
        self.ring = self.ring.seed(seed);
        self
    }

    /// The seed, if any (`None`: unseeded).
    pub fn seed_opt(mut self, seed: Option<u64>) -> EpisodeBuilder {
        self.ring = self.ring.seed_opt(seed);
        self
    }

    /// Creates the buffer (errors as [`Builder::create`]).
    pub fn create(self) -> Result<EpisodeBuffer> {
        let Some(user) = &self.ring.schema else {
            return Err(Error::InvalidArgument(
                "creating a buffer needs a capacity and a schema".into(),
            ));
        };
        let (schema, spec) = self.episodes.resolve(user)?;
        let ring = self.ring.schema(schema).create_ring(Some(spec))?;
        Ok(EpisodeBuffer::wrap(ring, spec))
    }

    /// Attaches to the existing episode buffer.
    pub fn open(self) -> Result<EpisodeBuffer> {
        let ring = self.ring.open_any()?;
        match ring.layout.episodes {
            Some((_, spec)) => Ok(EpisodeBuffer::wrap(ring, spec)),
            None => Err(Error::InvalidArgument(format!(
                "{} is a ReplayBuffer, not an EpisodeBuffer: open it with ReplayBuffer",
                ring.name()
            ))),
        }
    }
}

/// Episode streams in shared memory: writers in any number of processes append the frames of
/// their episodes ([`EpisodeWriter`]); samplers draw steps with frame stacks and n-step returns
/// ([`sample_columns`](Self::sample_columns)) or sequences
/// ([`sample_sequences`](Self::sample_sequences)). See the module docs for the layout.
#[derive(Debug)]
pub struct EpisodeBuffer {
    ring: Arc<ReplayBuffer>,
    spec: EpisodeSpec,
    /// Field indices of the metadata.
    prev_field: usize,
    step_field: usize,
    /// Offset of the `links` section.
    links: usize,
}

impl EpisodeBuffer {
    /// Options for creating or opening episode buffer `name`.
    pub fn builder(name: &str) -> EpisodeBuilder {
        EpisodeBuilder {
            ring: ReplayBuffer::builder(name),
            episodes: Episodes::default(),
        }
    }

    fn wrap(ring: ReplayBuffer, spec: EpisodeSpec) -> EpisodeBuffer {
        let fields = ring.schema().fields().len();
        let links = ring.layout.episodes.expect("an episode layout").0;
        EpisodeBuffer {
            ring: Arc::new(ring),
            spec,
            prev_field: fields - 2,
            step_field: fields - 1,
            links,
        }
    }

    /// The ring of frames underneath: counters, priorities, flow control, lifetime. Inserting
    /// or sampling records through it is refused ([`Error::InvalidArgument`]).
    pub fn ring(&self) -> &ReplayBuffer {
        &self.ring
    }

    /// Seeds this handle's draws ([`sample_columns`](Self::sample_columns),
    /// [`sample_sequences`](Self::sample_sequences)); see [`ReplayBuffer::reseed`].
    pub fn reseed(&self, seed: u64) {
        self.ring.reseed(seed);
    }

    /// [`ring`](Self::ring), shared: it stays mapped while either handle lives.
    pub fn shared_ring(&self) -> Arc<ReplayBuffer> {
        Arc::clone(&self.ring)
    }

    /// The user's fields (the ring's schema without the metadata), in order.
    pub fn fields(&self) -> &[crate::layout::schema::Field] {
        &self.ring.schema().fields()[..self.prev_field]
    }

    /// How many of the fields are observations.
    pub fn observation_count(&self) -> usize {
        self.spec.observations.count_ones() as usize
    }

    /// The buffer's episode settings, with field names.
    pub fn episodes(&self) -> Episodes {
        self.ring.episodes().expect("an episode buffer's ring")
    }

    pub fn name(&self) -> &str {
        self.ring.name()
    }

    pub fn path(&self) -> &PathBuf {
        &self.ring.path
    }

    /// Segment bytes per slot (per frame held), everything included.
    pub fn bytes_per_step(&self) -> f64 {
        self.ring.segment_bytes() as f64 / self.ring.capacity() as f64
    }

    fn link(&self, index: usize) -> &AtomicU64 {
        self.ring.segment.word(self.links + index * 8)
    }
}

impl ReplayBuffer {
    /// The episode settings of an episode buffer's ring (`None` for a plain ring): what
    /// `inspect` shows of an episode buffer.
    pub fn episodes(&self) -> Option<Episodes> {
        let (_, spec) = self.layout.episodes?;
        let fields = self.schema().fields();
        Some(Episodes {
            observations: fields
                .iter()
                .enumerate()
                .filter(|&(i, _)| spec.is_observation(i))
                .map(|(_, f)| f.name.clone())
                .collect(),
            reward: spec.reward.map(|r| fields[r].name.clone()),
            frame_stack: spec.frame_stack,
            padding: spec.padding,
            n_step: spec.n_step,
            gamma: spec.gamma,
        })
    }
}

/// A frame's `step` word.
fn step_word(position: u64, terminated: bool, truncated: bool) -> u64 {
    (position & POSITION_MASK)
        | if terminated { TERMINATED } else { 0 }
        | if truncated { TRUNCATED } else { 0 }
}
