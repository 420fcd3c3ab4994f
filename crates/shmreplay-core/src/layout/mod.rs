//! Where everything is in a segment: the header, its section directory, and the sections.
//! Pure computation: nothing here touches memory except [`write_header`] and [`read_header`].
//!
//! ```text
//! 0      header words: magic, layout version, ready flag, checksum, kind, features, sizes,
//!        creator, section count
//! 136    section directory: up to 8 entries of (tag, offset, length, version)
//! 392    the sampler: kind (0 uniform, 1 prioritized, 2 queue), alpha, eps, stratified
//! 424    the rate limiter: kind (0 none, 1 min size, 2 sample-to-insert ratio), samples per
//!        insert, min size, min diff, max diff
//! 464    episode buffers: n-step, frame stack and padding, gamma, observation fields, reward
//! 512    schema text
//! ...    sections, each at the offset its directory entry gives:
//!   control   the insert cursor and other buffer-wide words (flow control's counters, the
//!             shutdown flag, the futex words waiters sleep on), each on its own cache lines
//!   handles   MAX_HANDLES entries of 128 bytes: owner, intent, counters (see `protocol::handles`)
//!   slots     capacity slots: the slot's version word (its seqlock, see `protocol::slot`), then
//!             its record (records of 1 KiB or more start on the slot's second cache line, and
//!             their slots are whole cache lines)
//!   priority  prioritized buffers only: the sum tree of `protocol::priority`
//!   links     episode buffers only: one word per slot, the ticket (+ 1) of the next frame of
//!             the slot's episode (see `buffer::episodes`)
//! ```
//!
//! New regions (a priority tree, limiter words, stream indexes) come as new sections: they get
//! a tag and a directory entry and move nothing else. `attach` recomputes the whole layout from
//! the capacity and the schema and checks every header word and directory entry against it
//! before trusting a single offset.
//!
//! The version word sits right before its record, not in an array of its own: a random read
//! then touches one page and as few cache lines as possible (192 bytes, three lines, for the
//! 184-byte control record). Large records are cache-line aligned instead: `rep movsb` stores
//! them 13% faster than at an 8-byte offset (9.2 vs 8.0 GB/s for Atari frames, measured).

pub mod schema;

use std::path::Path;
use std::sync::atomic::Ordering;

use crate::error::{Error, Result};
use crate::platform::copy::Kernel;
use crate::platform::liveness::Identity;
use crate::platform::mapping::Segment;
use crate::protocol::flow::Limits;
use crate::protocol::priority::Geometry;
use schema::{fnv1a, DType, Schema, MAX_SCHEMA_TEXT};

pub(crate) const MAGIC: u64 = u64::from_le_bytes(*b"SHMRPLY\0");
/// Version 3: section directory, lock-based handle table, per-entry counters. Version 4: flow
/// control (the control section's counters and futex words, two more entry counters).
pub const LAYOUT_VERSION: u64 = 4;
const READY: u64 = 1;
/// `kind` of a plain ring of records.
pub(crate) const KIND_RING: u64 = 1;
/// Feature bit: the buffer samples by priority (it has a `priority` section). Versions that do
/// not know it refuse such a buffer instead of sampling it uniformly.
const FEATURE_PRIORITIZED: u64 = 1;
/// Feature bit: calls wait for the rate limiter of header words `H_LIMITER..`. Versions that do
/// not know it refuse the buffer instead of ignoring its limits.
const FEATURE_LIMITED: u64 = 2;
/// Feature bit: the buffer is a queue (each row delivered once, in order).
const FEATURE_QUEUE: u64 = 4;
/// Feature bit: the buffer holds episode streams (header words `H_N_STEP..`, a `links`
/// section); only `EpisodeBuffer` writes and samples it.
const FEATURE_EPISODES: u64 = 8;
/// Feature bits this version understands.
const KNOWN_FEATURES: u64 =
    FEATURE_PRIORITIZED | FEATURE_LIMITED | FEATURE_QUEUE | FEATURE_EPISODES;

pub const MAX_CAPACITY: u64 = 1 << 40;
/// Live handles (in any process) a buffer can have at once.
pub const MAX_HANDLES: usize = crate::protocol::slot::MAX_OWNERS;

// Header words.
pub(crate) const H_MAGIC: usize = 0;
pub(crate) const H_VERSION: usize = 8;
pub(crate) const H_READY: usize = 16;
pub(crate) const H_CHECKSUM: usize = 24;
/// Words from here up to `HEADER_END` are covered by the checksum (with the schema text).
const H_KIND: usize = 32;
const H_FEATURES: usize = 40;
const H_CAPACITY: usize = 48;
const H_RECORD_BYTES: usize = 56;
const H_SLOT_BYTES: usize = 64;
const H_RECORD_IN_SLOT: usize = 72;
const H_SCHEMA_LEN: usize = 80;
const H_SCHEMA_HASH: usize = 88;
const H_TOTAL_BYTES: usize = 96;
pub(crate) const H_CREATOR: usize = 104;
pub(crate) const H_CREATOR_NAMESPACE: usize = 112;
pub(crate) const H_CREATED_UNIX_NS: usize = 120;
const H_SECTION_COUNT: usize = 128;
const SECTION_DIRECTORY: usize = 136;
const MAX_SECTIONS: usize = 8;
const SECTION_ENTRY_BYTES: usize = 32;
const H_SAMPLER: usize = 392;
const H_ALPHA: usize = 400;
const H_EPS: usize = 408;
const H_STRATIFIED: usize = 416;
const H_LIMITER: usize = 424;
const H_SAMPLES_PER_INSERT: usize = 432;
const H_MIN_SIZE: usize = 440;
const H_MIN_DIFF: usize = 448;
const H_MAX_DIFF: usize = 456;
const H_N_STEP: usize = 464;
const H_FRAME_STACK: usize = 472;
const H_GAMMA: usize = 480;
const H_OBSERVATIONS: usize = 488;
const H_REWARD: usize = 496;
const HEADER_END: usize = 512;
const SCHEMA_TEXT: usize = HEADER_END;

/// Bytes of one handle-table entry (two cache lines: owners never share a line).
pub(crate) const ENTRY_BYTES: usize = 128;
/// Records from this size on start on a cache line of their own (see the module docs).
const ALIGNED_RECORD_BYTES: usize = 1024;
/// Records up to this size are copied whole, through a private staging buffer, instead of one
/// copy per field: for 184-byte records, sampling got 2x faster (measured at 10M slots).
pub(crate) const STAGED_RECORD_BYTES: usize = 256;

// Words of the control section, each on its own pair of cache lines.
/// The next insert ticket.
pub(crate) const C_CURSOR: usize = 0;
/// One more than the highest handle entry ever registered: sums over entries stop there.
pub(crate) const C_ENTRIES_USED: usize = 128;
/// Flow control's `S`: rows admitted to sampling (rate-limited rings).
pub(crate) const C_SAMPLED: usize = 256;
/// A queue's head: tickets below it were delivered (or skipped: their writer died).
pub(crate) const C_HEAD: usize = 384;
/// A hint on the head's line: the ticket + 1 from which a queue consumer is copying, so that
/// another consumer copies the rows after those instead of the same ones.
pub(crate) const C_TAKING: usize = C_HEAD + 8;
/// Nonzero once `shutdown` was called: calls that would wait fail instead.
pub(crate) const C_SHUTDOWN: usize = 512;
/// The futex word (32 bits) inserts wait on, and the count of its waiters (the next 32 bits).
pub(crate) const C_INSERT_EVENT: usize = 640;
/// The same for samples.
pub(crate) const C_SAMPLE_EVENT: usize = 768;
/// Tickets of a rate-limited ring whose inserts are done with them (committed, or overwritten
/// before they were written), counted after the insert: what its samples are admitted against
/// (never rows still being written, or left by a dead writer).
pub(crate) const C_COMMITTED: usize = 896;
const CONTROL_BYTES: usize = 1024;

/// A region of the segment named in the section directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Section {
    pub tag: [u8; 8],
    pub offset: usize,
    pub len: usize,
    pub version: u64,
}

impl Section {
    fn name(&self) -> String {
        String::from_utf8_lossy(&self.tag)
            .trim_end_matches('\0')
            .escape_default()
            .to_string()
    }
}

pub(crate) const CONTROL: [u8; 8] = *b"control\0";
pub(crate) const HANDLES: [u8; 8] = *b"handles\0";
pub(crate) const SLOTS: [u8; 8] = *b"slots\0\0\0";
pub(crate) const PRIORITY: [u8; 8] = *b"priority";
pub(crate) const LINKS: [u8; 8] = *b"links\0\0\0";

/// What frames before an episode's first one are in a frame stack.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Padding {
    /// The episode's first frame, repeated (gymnasium's `FrameStackObservation` default).
    #[default]
    First,
    /// Zeros.
    Zeros,
}

/// The largest `n_step` and `frame_stack` of an episode buffer (a sample walks that many
/// frames per item).
pub const MAX_EPISODE_WINDOW: usize = 4096;

/// How an episode buffer turns its frames into items, with its fields named by their index
/// in the schema (fixed at creation; header words `H_N_STEP..`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct EpisodeSpec {
    /// Bit `i` set: field `i` is an observation (stored once per frame, stacked when sampled).
    pub observations: u64,
    /// The field summed over n steps, if any.
    pub reward: Option<usize>,
    pub frame_stack: usize,
    pub padding: Padding,
    pub n_step: usize,
    pub gamma: f64,
}

impl EpisodeSpec {
    /// Refuses a spec that does not fit `schema` (its last two fields are the episode
    /// metadata; see `buffer::episodes`).
    pub fn validate(&self, schema: &Schema) -> Result<()> {
        let bad = |why: String| Err(Error::InvalidArgument(why));
        let user_fields = schema.fields().len().saturating_sub(2);
        for (name, value) in [("n_step", self.n_step), ("frame_stack", self.frame_stack)] {
            if !(1..=MAX_EPISODE_WINDOW).contains(&value) {
                return bad(format!(
                    "{name} must be between 1 and {MAX_EPISODE_WINDOW}, got {value}"
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.gamma) {
            return bad(format!("gamma must be between 0 and 1, got {}", self.gamma));
        }
        let outside = if user_fields >= 64 {
            0
        } else {
            self.observations >> user_fields
        };
        if self.observations == 0 || outside != 0 {
            return bad(format!(
                "observation field bits {:#x} do not name fields among the first {} (of 64 at \
                 most)",
                self.observations,
                user_fields.min(64)
            ));
        }
        if let Some(r) = self.reward {
            if r >= user_fields || self.observations >> r & 1 == 1 {
                return bad(format!("reward field {r} is not a non-observation field"));
            }
            let field = &schema.fields()[r];
            if !field.shape.is_empty() || !matches!(field.dtype, DType::F32 | DType::F64) {
                return bad(format!(
                    "the reward field {:?} must be a scalar float32 or float64 field, got {} {:?}",
                    field.name,
                    field.dtype.code(),
                    field.shape
                ));
            }
        }
        Ok(())
    }

    pub fn is_observation(&self, field: usize) -> bool {
        field < 64 && self.observations >> field & 1 == 1
    }

    fn words(&self) -> [(usize, u64); 5] {
        let padding = match self.padding {
            Padding::First => 0,
            Padding::Zeros => 1,
        };
        [
            (H_N_STEP, self.n_step as u64),
            (H_FRAME_STACK, self.frame_stack as u64 | padding << 32),
            (H_GAMMA, self.gamma.to_bits()),
            (H_OBSERVATIONS, self.observations),
            (H_REWARD, self.reward.map_or(0, |r| r as u64 + 1)),
        ]
    }

    fn from_words(word: impl Fn(usize) -> u64) -> std::result::Result<EpisodeSpec, String> {
        let stack = word(H_FRAME_STACK);
        let padding = match stack >> 32 {
            0 => Padding::First,
            1 => Padding::Zeros,
            other => return Err(format!("stack padding {other} is not 0 or 1")),
        };
        let size = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        Ok(EpisodeSpec {
            observations: word(H_OBSERVATIONS),
            reward: match word(H_REWARD) {
                0 => None,
                r => Some(size(r - 1)),
            },
            frame_stack: size(stack & 0xffff_ffff),
            padding,
            n_step: size(word(H_N_STEP)),
            gamma: f64::from_bits(word(H_GAMMA)),
        })
    }
}

/// How a buffer draws its samples; fixed at creation.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Sampler {
    /// Every slot holding a record is equally likely.
    #[default]
    Uniform,
    /// In proportion to `v = (p + eps)^alpha` of each record's priority `p`.
    Prioritized(Prioritized),
    /// First in, first out: each row is delivered to exactly one sample call, in insert order,
    /// and never overwritten before (inserts wait while the ring is full).
    Queue,
}

/// The parameters of prioritized sampling (Schaul et al., 2016).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Prioritized {
    /// The exponent: 0 is uniform, 1 fully proportional.
    pub alpha: f64,
    /// Added to every raw priority before the exponent (keeps zero-error items drawable).
    pub eps: f64,
    /// Each of the B rows of a batch draws from its own 1/B of the total mass (else i.i.d.).
    pub stratified: bool,
}

impl Default for Prioritized {
    fn default() -> Self {
        Prioritized {
            alpha: 0.6,
            eps: 1e-6,
            stratified: true,
        }
    }
}

impl Sampler {
    /// Refuses parameters that make no sense (negative or non-finite alpha or eps).
    pub fn validate(&self) -> Result<()> {
        if let Sampler::Prioritized(p) = self {
            for (name, value) in [("alpha", p.alpha), ("eps", p.eps)] {
                if !(value.is_finite() && value >= 0.0) {
                    return Err(Error::InvalidArgument(format!(
                        "Prioritized: {name} must be a finite number >= 0, got {value}"
                    )));
                }
            }
        }
        Ok(())
    }

    pub fn prioritized(&self) -> Option<&Prioritized> {
        match self {
            Sampler::Prioritized(p) => Some(p),
            Sampler::Uniform | Sampler::Queue => None,
        }
    }
}

/// When samples and inserts may proceed (Reverb's rate limiters); fixed at creation. Calls
/// that are not allowed yet wait (see `protocol::flow`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Limiter {
    /// Samples wait until the buffer holds `min_size` rows; inserts never wait.
    MinSize(u64),
    /// Keeps `I·samples_per_insert − S` (inserts `I`, sampled rows `S`) within
    /// `[min_diff, max_diff]` once `min_size` rows are in: samples wait when it would drop
    /// below, inserts when it would rise above.
    SampleToInsertRatio {
        samples_per_insert: f64,
        min_size: u64,
        min_diff: f64,
        max_diff: f64,
    },
}

impl Limiter {
    /// Reverb's symmetric error buffer: `[spi·min_size − error_buffer, spi·min_size +
    /// error_buffer]`.
    pub fn sample_to_insert_ratio(
        samples_per_insert: f64,
        min_size: u64,
        error_buffer: f64,
    ) -> Limiter {
        let center = samples_per_insert * min_size as f64;
        Limiter::SampleToInsertRatio {
            samples_per_insert,
            min_size,
            min_diff: center - error_buffer,
            max_diff: center + error_buffer,
        }
    }

    /// The formulas' parameters.
    pub fn limits(&self) -> Limits {
        match *self {
            Limiter::MinSize(min_size) => Limits {
                samples_per_insert: 1.0,
                min_size,
                min_diff: f64::NEG_INFINITY,
                max_diff: f64::INFINITY,
            },
            Limiter::SampleToInsertRatio {
                samples_per_insert,
                min_size,
                min_diff,
                max_diff,
            } => Limits {
                samples_per_insert,
                min_size,
                min_diff,
                max_diff,
            },
        }
    }

    /// Refuses limits that could deadlock or make no sense (Reverb's rules).
    pub fn validate(&self, capacity: u64) -> Result<()> {
        let bad = |why: String| Err(Error::InvalidArgument(why));
        let l = self.limits();
        let name = match self {
            Limiter::MinSize(_) => "MinSize",
            Limiter::SampleToInsertRatio { .. } => "SampleToInsertRatio",
        };
        if l.min_size < 1 || l.min_size > capacity {
            return bad(format!(
                "{name}: min_size must be between 1 and the capacity ({capacity}), got {}",
                l.min_size
            ));
        }
        if let Limiter::SampleToInsertRatio { .. } = self {
            let spi = l.samples_per_insert;
            if !(spi.is_finite() && spi > 0.0) {
                return bad(format!(
                    "{name}: samples_per_insert must be a finite number > 0, got {spi}"
                ));
            }
            if l.min_diff.is_nan() || l.max_diff.is_nan() {
                return bad(format!("{name}: the error buffer must not be NaN"));
            }
            // (Two infinite ends of one sign make the window NaN.)
            if l.window().is_nan() || l.window() < 2.0 * spi.max(1.0) {
                return bad(format!(
                    "{name}: max_diff − min_diff = {} is below 2·max(1, samples_per_insert) = {}: \
                     inserts and samples could block each other forever",
                    l.window(),
                    2.0 * spi.max(1.0)
                ));
            }
            if l.min_diff > spi * l.min_size as f64 {
                return bad(format!(
                    "{name}: min_diff {} is above samples_per_insert·min_size = {}: the first \
                     sample could never be allowed",
                    l.min_diff,
                    spi * l.min_size as f64
                ));
            }
        }
        Ok(())
    }
}

/// How a buffer controls the flow of its calls.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Flow {
    /// Nothing ever waits.
    Free,
    /// A rate limiter on a ring.
    Limited(Limits),
    /// A queue: Reverb's `Queue(capacity)` limits, `D` the rows delivered.
    Queue(Limits),
}

/// Where everything is in a segment of a given capacity and schema.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Layout {
    pub capacity: usize,
    pub record_bytes: usize,
    pub schema_len: usize,
    /// Version word, padding for large records, record.
    pub slot_bytes: usize,
    /// Where the record starts in its slot.
    pub record_in_slot: usize,
    /// The sections' offsets, as fields: the hot paths address slots without a lookup.
    pub control_offset: usize,
    pub handles_offset: usize,
    pub slots_offset: usize,
    /// The priority tree's section and geometry (prioritized buffers only).
    pub priority: Option<(usize, Geometry)>,
    /// Episode buffers: their spec and the offset of their `links` section.
    pub episodes: Option<(usize, EpisodeSpec)>,
    pub sampler: Sampler,
    pub limiter: Option<Limiter>,
    pub sections: Vec<Section>,
    pub total_bytes: usize,
}

impl Layout {
    pub fn new(
        capacity: u64,
        record_bytes: usize,
        schema_len: usize,
        sampler: Sampler,
        limiter: Option<Limiter>,
    ) -> Result<Layout> {
        sampler.validate()?;
        if let Some(limiter) = &limiter {
            if sampler == Sampler::Queue {
                return Err(Error::InvalidArgument(
                    "a Queue() has its own flow control: it takes no limiter".into(),
                ));
            }
            limiter.validate(capacity)?;
        }
        if capacity == 0 || capacity > MAX_CAPACITY {
            return Err(Error::InvalidArgument(format!(
                "capacity must be between 1 and {MAX_CAPACITY}, got {capacity}"
            )));
        }
        if schema_len > MAX_SCHEMA_TEXT {
            return Err(Error::InvalidSchema(format!(
                "the schema text takes {schema_len} bytes, more than the limit of {MAX_SCHEMA_TEXT}"
            )));
        }
        let too_big = || {
            Error::InvalidArgument(format!(
                "capacity {capacity} × {record_bytes}-byte records is too large"
            ))
        };
        let capacity = usize::try_from(capacity).map_err(|_| too_big())?;
        let record_in_slot = if record_bytes >= ALIGNED_RECORD_BYTES {
            64
        } else {
            8
        };
        let slot_bytes = record_bytes
            .checked_add(record_in_slot)
            .and_then(|s| s.checked_next_multiple_of(record_in_slot))
            .ok_or_else(too_big)?;
        let control_offset = (SCHEMA_TEXT + schema_len).next_multiple_of(128);
        let handles_offset = control_offset + CONTROL_BYTES;
        let slots_offset = (handles_offset + MAX_HANDLES * ENTRY_BYTES).next_multiple_of(4096);
        let slots_len = capacity.checked_mul(slot_bytes).ok_or_else(too_big)?;
        let slots_end = slots_offset.checked_add(slots_len).ok_or_else(too_big)?;
        let priority = match sampler.prioritized() {
            None => None,
            Some(_) => {
                let offset = slots_end
                    .checked_next_multiple_of(4096)
                    .ok_or_else(too_big)?;
                Some((offset, Geometry::new(capacity)))
            }
        };
        let total_bytes = match &priority {
            Some((offset, geometry)) => offset.checked_add(geometry.bytes),
            None => Some(slots_end),
        }
        .filter(|&t| t as u64 <= i64::MAX as u64)
        .ok_or_else(too_big)?;
        let section = |tag, offset, len| Section {
            tag,
            offset,
            len,
            version: 1,
        };
        let mut sections = vec![
            section(CONTROL, control_offset, CONTROL_BYTES),
            section(HANDLES, handles_offset, MAX_HANDLES * ENTRY_BYTES),
            section(SLOTS, slots_offset, slots_len),
        ];
        if let Some((offset, geometry)) = &priority {
            sections.push(section(PRIORITY, *offset, geometry.bytes));
        }
        debug_assert!(
            sections.len() <= MAX_SECTIONS
                && SECTION_DIRECTORY + MAX_SECTIONS * SECTION_ENTRY_BYTES <= HEADER_END
        );
        Ok(Layout {
            capacity,
            record_bytes,
            schema_len,
            slot_bytes,
            record_in_slot,
            control_offset,
            handles_offset,
            slots_offset,
            priority,
            episodes: None,
            sampler,
            limiter,
            sections,
            total_bytes,
        })
    }

    /// This layout with an episode buffer's `links` section at its end.
    pub fn with_episodes(mut self, spec: EpisodeSpec) -> Result<Layout> {
        if self.sampler == Sampler::Queue {
            return Err(Error::InvalidArgument(
                "an EpisodeBuffer samples windows of steps, not rows in insert order: it takes \
                 Uniform() or Prioritized(), not Queue()"
                    .into(),
            ));
        }
        let too_big = || {
            Error::InvalidArgument(format!(
                "capacity {} × {}-byte records is too large",
                self.capacity, self.record_bytes
            ))
        };
        let offset = self
            .total_bytes
            .checked_next_multiple_of(4096)
            .ok_or_else(too_big)?;
        let len = self.capacity.checked_mul(8).ok_or_else(too_big)?;
        self.total_bytes = offset
            .checked_add(len)
            .filter(|&t| t as u64 <= i64::MAX as u64)
            .ok_or_else(too_big)?;
        self.sections.push(Section {
            tag: LINKS,
            offset,
            len,
            version: 1,
        });
        self.episodes = Some((offset, spec));
        Ok(self)
    }

    /// How calls wait.
    pub fn flow(&self) -> Flow {
        match (self.sampler, self.limiter) {
            (Sampler::Queue, _) => Flow::Queue(Limits {
                samples_per_insert: 1.0,
                min_size: 1,
                min_diff: 0.0,
                max_diff: self.capacity as f64,
            }),
            (_, Some(limiter)) => Flow::Limited(limiter.limits()),
            (_, None) => Flow::Free,
        }
    }

    /// Records copied whole through a private buffer (see [`STAGED_RECORD_BYTES`]).
    pub fn staged(&self) -> bool {
        self.record_bytes <= STAGED_RECORD_BYTES
    }

    #[cfg(test)]
    fn section(&self, tag: [u8; 8]) -> Section {
        *self
            .sections
            .iter()
            .find(|s| s.tag == tag)
            .expect("every layout has its sections")
    }
}

/// Fills in a new segment's header; the ready flag goes last.
pub(crate) fn write_header(
    segment: &Segment,
    schema: &Schema,
    layout: &Layout,
    schema_text: &str,
    creator: Identity,
    created_unix_ns: u64,
) {
    let (mut features, sampler_words) = match layout.sampler {
        Sampler::Uniform => (0, [0; 4]),
        Sampler::Queue => (FEATURE_QUEUE, [2, 0, 0, 0]),
        Sampler::Prioritized(p) => (
            FEATURE_PRIORITIZED,
            [
                1,
                p.alpha.to_bits(),
                p.eps.to_bits(),
                u64::from(p.stratified),
            ],
        ),
    };
    let limiter_words = match layout.limiter {
        None => [0; 5],
        Some(limiter) => {
            features |= FEATURE_LIMITED;
            let l = limiter.limits();
            let kind = match limiter {
                Limiter::MinSize(_) => 1,
                Limiter::SampleToInsertRatio { .. } => 2,
            };
            [
                kind,
                l.samples_per_insert.to_bits(),
                l.min_size,
                l.min_diff.to_bits(),
                l.max_diff.to_bits(),
            ]
        }
    };
    if layout.episodes.is_some() {
        features |= FEATURE_EPISODES;
    }
    let mut words = vec![
        (H_KIND, KIND_RING),
        (H_FEATURES, features),
        (H_CAPACITY, layout.capacity as u64),
        (H_RECORD_BYTES, layout.record_bytes as u64),
        (H_SLOT_BYTES, layout.slot_bytes as u64),
        (H_RECORD_IN_SLOT, layout.record_in_slot as u64),
        (H_SCHEMA_LEN, layout.schema_len as u64),
        (H_SCHEMA_HASH, schema.hash()),
        (H_TOTAL_BYTES, layout.total_bytes as u64),
        (H_CREATOR, creator.word),
        (H_CREATOR_NAMESPACE, creator.namespace),
        (H_CREATED_UNIX_NS, created_unix_ns),
        (H_SECTION_COUNT, layout.sections.len() as u64),
        (H_SAMPLER, sampler_words[0]),
        (H_ALPHA, sampler_words[1]),
        (H_EPS, sampler_words[2]),
        (H_STRATIFIED, sampler_words[3]),
        (H_LIMITER, limiter_words[0]),
        (H_SAMPLES_PER_INSERT, limiter_words[1]),
        (H_MIN_SIZE, limiter_words[2]),
        (H_MIN_DIFF, limiter_words[3]),
        (H_MAX_DIFF, limiter_words[4]),
    ];
    if let Some((_, spec)) = &layout.episodes {
        words.extend(spec.words());
    }
    for (i, s) in layout.sections.iter().enumerate() {
        let at = SECTION_DIRECTORY + i * SECTION_ENTRY_BYTES;
        words.extend([
            (at, u64::from_le_bytes(s.tag)),
            (at + 8, s.offset as u64),
            (at + 16, s.len as u64),
            (at + 24, s.version),
        ]);
    }
    for (offset, value) in words {
        segment.word(offset).store(value, Ordering::Relaxed);
    }
    segment.store_bytes(SCHEMA_TEXT, schema_text.as_bytes(), Kernel::Words);
    let sum = checksum(segment, schema_text.as_bytes());
    segment.word(H_CHECKSUM).store(sum, Ordering::Relaxed);
    segment
        .word(H_VERSION)
        .store(LAYOUT_VERSION, Ordering::Relaxed);
    segment.word(H_MAGIC).store(MAGIC, Ordering::Relaxed);
    // Release: whoever sees READY (Acquire) sees the whole header.
    segment.word(H_READY).store(READY, Ordering::Release);
}

/// The smallest file that can hold a header to check.
pub(crate) const MIN_SEGMENT_BYTES: u64 = SCHEMA_TEXT as u64;

/// Checks everything `attach` relies on before trusting a single offset of the segment.
pub(crate) fn read_header(segment: &Segment, path: &Path) -> Result<(Schema, Layout)> {
    let corrupt = |reason: String| Error::Corrupt {
        path: path.to_owned(),
        reason,
    };
    let word = |offset| segment.word(offset).load(Ordering::Relaxed);
    if word(H_MAGIC) != MAGIC {
        return Err(corrupt(
            "wrong magic number (not a shmreplay segment)".into(),
        ));
    }
    if word(H_VERSION) != LAYOUT_VERSION {
        return Err(corrupt(format!(
            "layout version {} (this shmreplay reads version {LAYOUT_VERSION}; a buffer made by \
             another version must be opened by that version, or removed and created anew)",
            word(H_VERSION)
        )));
    }
    // Segments are published complete (see `Segment::create`): not ready means damaged.
    if segment.word(H_READY).load(Ordering::Acquire) != READY {
        return Err(corrupt("its ready flag is not set".into()));
    }
    let schema_len = word(H_SCHEMA_LEN);
    if schema_len > MAX_SCHEMA_TEXT as u64 || SCHEMA_TEXT as u64 + schema_len > segment.len() as u64
    {
        return Err(corrupt(format!(
            "schema length {schema_len} is out of range"
        )));
    }
    let mut text = vec![0u8; schema_len as usize];
    segment.load_bytes(SCHEMA_TEXT, &mut text, Kernel::Words);
    if checksum(segment, &text) != word(H_CHECKSUM) {
        return Err(corrupt(
            "header checksum mismatch (the header was overwritten or damaged)".into(),
        ));
    }
    if word(H_KIND) != KIND_RING {
        return Err(corrupt(format!(
            "buffer kind {} (this shmreplay opens ring buffers, kind {KIND_RING})",
            word(H_KIND)
        )));
    }
    let unknown = word(H_FEATURES) & !KNOWN_FEATURES;
    if unknown != 0 {
        return Err(corrupt(format!(
            "it uses features this shmreplay does not know (bits {unknown:#x})"
        )));
    }
    let text = String::from_utf8(text).map_err(|_| corrupt("schema is not UTF-8".into()))?;
    let schema = Schema::decode(&text).map_err(|e| corrupt(e.to_string()))?;
    if schema.hash() != word(H_SCHEMA_HASH) {
        return Err(corrupt("schema hash mismatch".into()));
    }
    let features = word(H_FEATURES);
    let sampler_features = features & (FEATURE_PRIORITIZED | FEATURE_QUEUE);
    let sampler = match (word(H_SAMPLER), sampler_features) {
        (0, 0) => Sampler::Uniform,
        (2, FEATURE_QUEUE) => Sampler::Queue,
        (1, FEATURE_PRIORITIZED) => Sampler::Prioritized(Prioritized {
            alpha: f64::from_bits(word(H_ALPHA)),
            eps: f64::from_bits(word(H_EPS)),
            stratified: match word(H_STRATIFIED) {
                0 => false,
                1 => true,
                other => return Err(corrupt(format!("sampler flag {other} is not 0 or 1"))),
            },
        }),
        (kind, _) => {
            return Err(corrupt(format!(
                "sampler kind {kind} does not match the feature bits {features:#x}"
            )))
        }
    };
    let float = |offset| f64::from_bits(word(offset));
    let limiter = match (word(H_LIMITER), features & FEATURE_LIMITED != 0) {
        (0, false) => None,
        (1, true) => Some(Limiter::MinSize(word(H_MIN_SIZE))),
        (2, true) => Some(Limiter::SampleToInsertRatio {
            samples_per_insert: float(H_SAMPLES_PER_INSERT),
            min_size: word(H_MIN_SIZE),
            min_diff: float(H_MIN_DIFF),
            max_diff: float(H_MAX_DIFF),
        }),
        (kind, _) => {
            return Err(corrupt(format!(
                "limiter kind {kind} does not match the feature bits {features:#x}"
            )))
        }
    };
    // The limiter's words must be exactly what creating it writes (MinSize's unused words too).
    if let Some(limiter) = limiter {
        let l = limiter.limits();
        let expected = [
            (H_SAMPLES_PER_INSERT, l.samples_per_insert.to_bits()),
            (H_MIN_DIFF, l.min_diff.to_bits()),
            (H_MAX_DIFF, l.max_diff.to_bits()),
        ];
        if let Some((offset, _)) = expected.iter().find(|&&(o, bits)| word(o) != bits) {
            return Err(corrupt(format!(
                "limiter word at byte {offset} does not match the limiter's kind"
            )));
        }
    }
    let mut layout = Layout::new(
        word(H_CAPACITY),
        schema.record_bytes(),
        text.len(),
        sampler,
        limiter,
    )
    .map_err(|e| corrupt(e.to_string()))?;
    if features & FEATURE_EPISODES != 0 {
        let spec = EpisodeSpec::from_words(word).map_err(corrupt)?;
        spec.validate(&schema)
            .and_then(|()| crate::buffer::episodes::check_metadata_fields(&schema))
            .map_err(|e| corrupt(format!("episode words: {e}")))?;
        if spec
            .words()
            .iter()
            .any(|&(offset, value)| word(offset) != value)
        {
            return Err(corrupt(
                "episode words are not what creating it writes".into(),
            ));
        }
        layout = layout
            .with_episodes(spec)
            .map_err(|e| corrupt(e.to_string()))?;
    }
    let stored = [
        (H_RECORD_BYTES, layout.record_bytes),
        (H_SLOT_BYTES, layout.slot_bytes),
        (H_RECORD_IN_SLOT, layout.record_in_slot),
        (H_TOTAL_BYTES, layout.total_bytes),
        (H_SECTION_COUNT, layout.sections.len()),
    ];
    for (offset, expected) in stored {
        if word(offset) != expected as u64 {
            return Err(corrupt(format!(
                "header word at byte {offset} is {}, the schema and capacity imply {expected}",
                word(offset)
            )));
        }
    }
    for (i, expected) in layout.sections.iter().enumerate() {
        let at = SECTION_DIRECTORY + i * SECTION_ENTRY_BYTES;
        let found = Section {
            tag: word(at).to_le_bytes(),
            offset: word(at + 8) as usize,
            len: word(at + 16) as usize,
            version: word(at + 24),
        };
        if found.tag != expected.tag {
            return Err(corrupt(format!(
                "section {i} is {:?}, expected {:?} (made by another shmreplay version?)",
                found.name(),
                expected.name()
            )));
        }
        if found != *expected {
            return Err(corrupt(format!(
                "section {:?} is at {}..+{} version {}, the schema and capacity imply {}..+{} \
                 version {}",
                expected.name(),
                found.offset,
                found.len,
                found.version,
                expected.offset,
                expected.len,
                expected.version
            )));
        }
    }
    if segment.len() != layout.total_bytes {
        return Err(corrupt(format!(
            "file is {} bytes, its header says {}",
            segment.len(),
            layout.total_bytes
        )));
    }
    Ok((schema, layout))
}

/// The creator recorded in the header.
pub(crate) fn creator(segment: &Segment) -> Identity {
    Identity {
        word: segment.word(H_CREATOR).load(Ordering::Relaxed),
        namespace: segment.word(H_CREATOR_NAMESPACE).load(Ordering::Relaxed),
    }
}

/// FNV-1a over the checksummed header words and the schema text.
fn checksum(segment: &Segment, schema_text: &[u8]) -> u64 {
    let mut bytes = Vec::with_capacity(HEADER_END - H_KIND + schema_text.len());
    for offset in (H_KIND..HEADER_END).step_by(8) {
        bytes.extend_from_slice(&segment.word(offset).load(Ordering::Relaxed).to_le_bytes());
    }
    bytes.extend_from_slice(schema_text);
    fnv1a(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_aligned_disjoint_and_in_order() {
        for (capacity, record) in [(1u64, 8usize), (1000, 184), (7, 56_464), (1 << 20, 24)] {
            for sampler in [
                Sampler::Uniform,
                Sampler::Prioritized(Prioritized::default()),
                Sampler::Queue,
            ] {
                let layout = Layout::new(capacity, record, 300, sampler, None).unwrap();
                let mut end = SCHEMA_TEXT + 300;
                for s in &layout.sections {
                    assert!(s.offset >= end, "{s:?} overlaps what comes before");
                    assert_eq!(s.offset % 128, 0);
                    end = s.offset + s.len;
                }
                assert_eq!(layout.section(SLOTS).offset % 4096, 0);
                assert_eq!(end, layout.total_bytes);
                assert!(layout.sections.len() <= MAX_SECTIONS);
                assert_eq!(layout.slot_bytes % 8, 0);
            }
        }
    }
}
