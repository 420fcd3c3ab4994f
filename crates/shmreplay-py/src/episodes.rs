//! `RawEpisodes` and `RawEpisodeWriter`: the episode buffer (wrapped by
//! `shmreplay.EpisodeBuffer`). Its ring's counters, priorities and lifetime go through a
//! `RawBuffer` sharing the same handle (`ring`).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use numpy::{PyArray1, PyUntypedArray};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use shmreplay_core::{
    DType, EpisodeBuffer, EpisodeWriter, Episodes, Error, OutColumn, Padding, PriorityOutputs,
    Schema, SequenceColumns, StepColumns, WaitUpTo,
};

use crate::arrays::{inputs, outputs};
use crate::{
    limiter_args, limiter_of, python_signal_raised, sampler_args, sampler_of, timeout_of, to_py,
    zeroed, F32Array, F64Array, LimiterArgs, RawBuffer, SamplerArgs, U64Array,
};

/// `(index, key, (probability, weight, priority) or None)` of a batch.
type Drawn<'py> = (
    U64Array<'py>,
    U64Array<'py>,
    Option<(F64Array<'py>, F32Array<'py>, F64Array<'py>)>,
);

/// A handle to one episode buffer.
#[pyclass(frozen, module = "shmreplay._core")]
pub(crate) struct RawEpisodes {
    inner: Mutex<Option<Arc<EpisodeBuffer>>>,
}

/// The streams of one vector env, private to the process (see `EpisodeWriter`).
#[pyclass(frozen, module = "shmreplay._core")]
pub(crate) struct RawEpisodeWriter {
    state: Mutex<EpisodeWriter>,
}

impl RawEpisodes {
    fn get(&self) -> PyResult<Arc<EpisodeBuffer>> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| PyValueError::new_err("operation on a closed EpisodeBuffer"))
    }

    fn open(
        py: Python<'_>,
        make: impl FnOnce() -> shmreplay_core::Result<EpisodeBuffer> + Send,
    ) -> PyResult<RawEpisodes> {
        let buffer = py.detach(make).map_err(|e| to_py(py, e))?;
        Ok(RawEpisodes {
            inner: Mutex::new(Some(Arc::new(buffer))),
        })
    }

    /// Draws with `draw`, by priority if the buffer has a prioritized sampler (`beta`).
    fn drawn<'py>(
        py: Python<'py>,
        buffer: &EpisodeBuffer,
        batch_size: usize,
        beta: f64,
        draw: impl FnOnce(
                &mut [u64],
                &mut [u64],
                Option<(PriorityOutputs<'_>, f64)>,
            ) -> shmreplay_core::Result<()>
            + Send,
    ) -> PyResult<Drawn<'py>> {
        let (mut index, mut key) = (zeroed(batch_size)?, zeroed(batch_size)?);
        let prioritized = buffer.ring().sampler().prioritized().is_some();
        let (mut probability, mut weight, mut priority) = if prioritized {
            (
                zeroed(batch_size)?,
                zeroed(batch_size)?,
                zeroed(batch_size)?,
            )
        } else {
            (Vec::new(), Vec::new(), Vec::new())
        };
        py.detach(|| {
            let info = prioritized.then(|| {
                let info = PriorityOutputs {
                    probability: &mut probability,
                    weight: &mut weight,
                    priority: &mut priority,
                };
                (info, beta)
            });
            draw(&mut index, &mut key, info)
        })
        .map_err(|e| to_py(py, e))?;
        let info = prioritized.then(|| {
            (
                PyArray1::from_vec(py, probability),
                PyArray1::from_vec(py, weight),
                PyArray1::from_vec(py, priority),
            )
        });
        Ok((
            PyArray1::from_vec(py, index),
            PyArray1::from_vec(py, key),
            info,
        ))
    }
}

/// An episode buffer's settings as the Python package takes them:
/// `(observations, reward, frame_stack, padding, n_step, gamma)`.
pub(crate) type EpisodeArgs = (Vec<String>, Option<String>, usize, &'static str, usize, f64);

pub(crate) fn episode_args(e: Episodes) -> EpisodeArgs {
    let padding = match e.padding {
        Padding::First => "first",
        Padding::Zeros => "zeros",
    };
    (
        e.observations,
        e.reward,
        e.frame_stack,
        padding,
        e.n_step,
        e.gamma,
    )
}

/// Splits `all` into the first `n` and the rest.
fn split<'a>(
    mut all: Vec<OutColumn<'a>>,
    n: usize,
) -> PyResult<(Vec<OutColumn<'a>>, Vec<OutColumn<'a>>)> {
    if all.len() < n {
        return Err(PyValueError::new_err("too few output arrays"));
    }
    let rest = all.split_off(n);
    Ok((all, rest))
}

#[pymethods]
impl RawEpisodes {
    /// Creates an episode buffer; `fields` as `RawBuffer.create`, `padding` "first" or
    /// "zeros".
    #[staticmethod]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (name, dir, capacity, fields, observations, reward, frame_stack, padding,
                        n_step, gamma, sampler=None, limiter=None, seed=None, huge_pages=false))]
    fn create(
        py: Python<'_>,
        name: &str,
        dir: Option<PathBuf>,
        capacity: u64,
        fields: Vec<(String, String, Vec<usize>)>,
        observations: Vec<String>,
        reward: Option<String>,
        frame_stack: usize,
        padding: &str,
        n_step: usize,
        gamma: f64,
        sampler: Option<SamplerArgs>,
        limiter: Option<LimiterArgs>,
        seed: Option<u64>,
        huge_pages: bool,
    ) -> PyResult<RawEpisodes> {
        let sampler = sampler_of(sampler)?;
        let limiter = limiter_of(limiter)?;
        let padding = match padding {
            "first" => Padding::First,
            "zeros" => Padding::Zeros,
            other => {
                return Err(PyValueError::new_err(format!(
                    "stack_padding must be \"first\" or \"zeros\", got {other:?}"
                )))
            }
        };
        let schema = fields
            .into_iter()
            .map(|(n, code, shape)| Ok((n, DType::from_code(&code)?, shape)))
            .collect::<shmreplay_core::Result<Vec<_>>>()
            .and_then(|f| Schema::new(&f))
            .map_err(|e| to_py(py, e))?;
        let episodes = Episodes {
            observations,
            reward,
            frame_stack,
            padding,
            n_step,
            gamma,
        };
        RawEpisodes::open(py, || {
            EpisodeBuffer::builder(name)
                .dir_opt(dir.as_deref())
                .capacity(capacity)
                .schema(schema)
                .episodes(episodes)
                .sampler(sampler)
                .limiter(limiter)
                .seed_opt(seed)
                .huge_pages(huge_pages)
                .create()
        })
    }

    #[staticmethod]
    #[pyo3(signature = (name, dir, seed=None))]
    fn attach(
        py: Python<'_>,
        name: &str,
        dir: Option<PathBuf>,
        seed: Option<u64>,
    ) -> PyResult<RawEpisodes> {
        RawEpisodes::open(py, || {
            EpisodeBuffer::builder(name)
                .dir_opt(dir.as_deref())
                .seed_opt(seed)
                .open()
        })
    }

    /// A `RawBuffer` sharing this handle's ring (counters, priorities, flow control, unlink).
    fn ring(&self, py: Python<'_>) -> PyResult<RawBuffer> {
        Ok(RawBuffer::shared(py, self.get()?.shared_ring()))
    }

    /// `[(name, dtype code, shape)]` of the user's fields.
    #[getter]
    fn fields(&self) -> PyResult<Vec<(String, &'static str, Vec<usize>)>> {
        Ok(self
            .get()?
            .fields()
            .iter()
            .map(|f| (f.name.clone(), f.dtype.code(), f.shape.clone()))
            .collect())
    }

    /// `(observations, reward, frame_stack, padding, n_step, gamma)`.
    #[getter]
    fn episodes(&self) -> PyResult<EpisodeArgs> {
        Ok(episode_args(self.get()?.episodes()))
    }

    #[getter]
    fn sampler(&self) -> PyResult<Option<SamplerArgs>> {
        Ok(sampler_args(self.get()?.ring().sampler()))
    }

    #[getter]
    fn limiter(&self) -> PyResult<Option<LimiterArgs>> {
        Ok(limiter_args(self.get()?.ring().limiter()))
    }

    #[getter]
    fn bytes_per_step(&self) -> PyResult<f64> {
        Ok(self.get()?.bytes_per_step())
    }

    /// A writer of `num_envs` streams.
    fn writer(&self, num_envs: usize) -> PyResult<RawEpisodeWriter> {
        let buffer = self.get()?;
        let state = buffer
            .writer(num_envs)
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(RawEpisodeWriter {
            state: Mutex::new(state),
        })
    }

    /// Starts episodes in `envs` with first observations (one C-contiguous array per
    /// observation field, one row per listed env).
    #[pyo3(signature = (writer, envs, columns, timeout=None))]
    fn reset(
        &self,
        py: Python<'_>,
        writer: &RawEpisodeWriter,
        envs: Vec<usize>,
        columns: Vec<Bound<'_, PyUntypedArray>>,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        let buffer = self.get()?;
        let columns = inputs(&columns)?;
        let timeout = timeout_of(timeout)?;
        py.detach(|| {
            let mut state = writer.lock(timeout)?;
            buffer.reset(&mut state, &envs, &columns, &mut WaitUpTo(timeout))
        })
        .map_err(|e| to_py(py, e))
    }

    /// One step of every env: one C-contiguous array per field (one row per env), the flags
    /// as bool arrays, float64 raw priorities or None.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (writer, columns, terminated, truncated, priorities=None, timeout=None))]
    fn step(
        &self,
        py: Python<'_>,
        writer: &RawEpisodeWriter,
        columns: Vec<Bound<'_, PyUntypedArray>>,
        terminated: Vec<bool>,
        truncated: Vec<bool>,
        priorities: Option<Vec<f64>>,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        let buffer = self.get()?;
        let columns = inputs(&columns)?;
        let timeout = timeout_of(timeout)?;
        py.detach(|| {
            let mut state = writer.lock(timeout)?;
            buffer.step(
                &mut state,
                &columns,
                &terminated,
                &truncated,
                priorities.as_deref(),
                &mut WaitUpTo(timeout),
            )
        })
        .map_err(|e| to_py(py, e))
    }

    /// Fills `out` (one array per field, one per observation field for the next stacks, then
    /// discount, terminated, truncated) with a batch of steps.
    #[pyo3(signature = (out, batch_size, beta, timeout=None))]
    fn sample<'py>(
        &self,
        py: Python<'py>,
        out: Vec<Bound<'py, PyUntypedArray>>,
        batch_size: usize,
        beta: f64,
        timeout: Option<f64>,
    ) -> PyResult<Drawn<'py>> {
        let buffer = self.get()?;
        let fields = buffer.fields().len();
        let observations = buffer.observation_count();
        let (fields_out, rest) = split(outputs(&out)?, fields)?;
        let (next, rest) = split(rest, observations)?;
        let [discount, terminated, truncated]: [OutColumn<'_>; 3] = rest
            .try_into()
            .map_err(|_| PyValueError::new_err("wrong number of output arrays"))?;
        let columns = StepColumns {
            fields: fields_out,
            next,
            discount,
            terminated,
            truncated,
        };
        let timeout = timeout_of(timeout)?;
        Self::drawn(py, &buffer, batch_size, beta, |index, key, info| {
            buffer.sample_columns(&columns, index, key, info, &mut WaitUpTo(timeout))
        })
    }

    /// Fills `out` (one array per field, then terminated, truncated, is_first, mask) with a
    /// batch of sequences.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (out, batch_size, length, period, beta, timeout=None))]
    fn sample_sequences<'py>(
        &self,
        py: Python<'py>,
        out: Vec<Bound<'py, PyUntypedArray>>,
        batch_size: usize,
        length: usize,
        period: usize,
        beta: f64,
        timeout: Option<f64>,
    ) -> PyResult<Drawn<'py>> {
        let buffer = self.get()?;
        let fields = buffer.fields().len();
        let (fields_out, rest) = split(outputs(&out)?, fields)?;
        let [terminated, truncated, is_first, mask]: [OutColumn<'_>; 4] = rest
            .try_into()
            .map_err(|_| PyValueError::new_err("wrong number of output arrays"))?;
        let columns = SequenceColumns {
            fields: fields_out,
            terminated,
            truncated,
            is_first,
            mask,
        };
        let timeout = timeout_of(timeout)?;
        Self::drawn(py, &buffer, batch_size, beta, |index, key, info| {
            buffer.sample_sequences(
                &columns,
                length,
                period,
                index,
                key,
                info,
                &mut WaitUpTo(timeout),
            )
        })
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
    }

    /// Releases this handle (its ring's `RawBuffer` keeps the mapping until it is closed too).
    fn close(&self) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

impl RawEpisodeWriter {
    /// The streams, once no other thread writes through this writer: waited for (without the
    /// GIL) up to `timeout`, Ctrl-C ending the wait.
    fn lock(
        &self,
        timeout: Option<Duration>,
    ) -> shmreplay_core::Result<MutexGuard<'_, EpisodeWriter>> {
        let started = Instant::now();
        let mut checked = started;
        loop {
            match self.state.try_lock() {
                Ok(state) => return Ok(state),
                Err(TryLockError::Poisoned(state)) => return Ok(state.into_inner()),
                Err(TryLockError::WouldBlock) => {}
            }
            if timeout.is_some_and(|t| started.elapsed() >= t) {
                return Err(Error::Timeout(
                    "another thread is writing through this EpisodeWriter (it may be waiting for \
                     the limiter)"
                        .into(),
                ));
            }
            if checked.elapsed() >= SIGNAL_CHECK_EVERY {
                checked = Instant::now();
                if python_signal_raised() {
                    return Err(Error::Interrupted);
                }
            }
            std::thread::sleep(LOCK_POLL);
        }
    }
}

/// How often a thread waiting for a writer another thread uses looks for Ctrl-C, and how long
/// it sleeps between tries.
const SIGNAL_CHECK_EVERY: Duration = Duration::from_millis(20);
const LOCK_POLL: Duration = Duration::from_micros(200);

#[pymethods]
impl RawEpisodeWriter {
    #[getter]
    fn num_envs(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .num_envs()
    }
}
