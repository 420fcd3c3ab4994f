//! `shmreplay._core`: a thin PyO3 layer over `shmreplay-core`.
//!
//! Argument checking that needs numpy semantics (dtype casting, shapes) happens in the Python
//! package; this layer checks again what memory safety depends on (contiguity, byte counts,
//! writability) and releases the GIL around every copy and every wait.

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1, PyUntypedArray};
use pyo3::exceptions::{
    PyFileExistsError, PyFileNotFoundError, PyIndexError, PyKeyboardInterrupt, PyMemoryError,
    PyOSError, PyPermissionError, PyTimeoutError, PyTypeError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyTuple};
use shmreplay_core::{
    Blocking, DType, Error, Limiter, Prioritized, PriorityOutputs, ReplayBuffer, Sampler, Schema,
    WaitUpTo,
};

mod arrays;
mod episodes;
mod rows;

use arrays::{inputs, outputs};

/// A uint64 numpy array (sampled slot indices and keys).
pub(crate) type U64Array<'py> = Bound<'py, PyArray1<u64>>;
pub(crate) type F64Array<'py> = Bound<'py, PyArray1<f64>>;
pub(crate) type F32Array<'py> = Bound<'py, PyArray1<f32>>;

/// A sampler as the Python package passes it: `None` (uniform), `(alpha, eps, stratified)`
/// (prioritized) or `"queue"`.
#[derive(FromPyObject, IntoPyObject)]
pub(crate) enum SamplerArgs {
    Prioritized((f64, f64, bool)),
    Named(String),
}

pub(crate) fn sampler_of(args: Option<SamplerArgs>) -> PyResult<Sampler> {
    Ok(match args {
        None => Sampler::Uniform,
        Some(SamplerArgs::Prioritized((alpha, eps, stratified))) => {
            Sampler::Prioritized(Prioritized {
                alpha,
                eps,
                stratified,
            })
        }
        Some(SamplerArgs::Named(name)) if name == "queue" => Sampler::Queue,
        Some(SamplerArgs::Named(name)) => {
            return Err(PyValueError::new_err(format!("unknown sampler {name:?}")))
        }
    })
}

pub(crate) fn sampler_args(sampler: Sampler) -> Option<SamplerArgs> {
    match sampler {
        Sampler::Uniform => None,
        Sampler::Prioritized(p) => Some(SamplerArgs::Prioritized((p.alpha, p.eps, p.stratified))),
        Sampler::Queue => Some(SamplerArgs::Named("queue".into())),
    }
}

/// A limiter as the Python package passes it: `(kind, samples_per_insert, min_size, min_diff,
/// max_diff)`, kind `"MinSize"` or `"SampleToInsertRatio"`.
pub(crate) type LimiterArgs = (String, f64, u64, f64, f64);

pub(crate) fn limiter_of(args: Option<LimiterArgs>) -> PyResult<Option<Limiter>> {
    Ok(match args {
        None => None,
        Some((kind, _, min_size, _, _)) if kind == "MinSize" => Some(Limiter::MinSize(min_size)),
        Some((kind, samples_per_insert, min_size, min_diff, max_diff))
            if kind == "SampleToInsertRatio" =>
        {
            Some(Limiter::SampleToInsertRatio {
                samples_per_insert,
                min_size,
                min_diff,
                max_diff,
            })
        }
        Some((kind, ..)) => return Err(PyValueError::new_err(format!("unknown limiter {kind:?}"))),
    })
}

pub(crate) fn limiter_args(limiter: Option<Limiter>) -> Option<LimiterArgs> {
    limiter.map(|limiter| {
        let l = limiter.limits();
        let kind = match limiter {
            Limiter::MinSize(_) => "MinSize",
            Limiter::SampleToInsertRatio { .. } => "SampleToInsertRatio",
        };
        (
            kind.into(),
            l.samples_per_insert,
            l.min_size,
            l.min_diff,
            l.max_diff,
        )
    })
}

/// A flow-control timeout in seconds (`None`: wait until allowed; the package validates it).
pub(crate) fn timeout_of(seconds: Option<f64>) -> PyResult<Option<Duration>> {
    match seconds {
        None => Ok(None),
        Some(s) if s.is_nan() || s < 0.0 => Err(PyValueError::new_err(format!(
            "timeout must be None or >= 0 seconds, got {s}"
        ))),
        // Beyond what a Duration holds (about 585 billion years): no bound at all.
        Some(s) => Ok(Duration::try_from_secs_f64(s).ok()),
    }
}

/// The keys of a 1-d uint64 or int64 array (`ValueError` for a negative one); None for
/// anything else.
fn key_vector(keys: &Bound<'_, PyAny>) -> PyResult<Option<Vec<u64>>> {
    if let Ok(keys) = keys.cast::<PyArray1<u64>>() {
        return Ok(Some(keys.readonly().as_array().to_vec()));
    }
    if let Ok(keys) = keys.cast::<PyArray1<i64>>() {
        let keys = keys.readonly();
        let keys = keys.as_array();
        if keys.iter().any(|&k| k < 0) {
            return Err(PyValueError::new_err("keys must be >= 0"));
        }
        return Ok(Some(keys.iter().map(|&k| k as u64).collect()));
    }
    Ok(None)
}

/// The values of a 1-d float64 or float32 array; None for anything else.
fn float_vector(values: &Bound<'_, PyAny>) -> Option<Vec<f64>> {
    if let Ok(values) = values.cast::<PyArray1<f64>>() {
        return Some(values.readonly().as_array().to_vec());
    }
    let values = values.cast::<PyArray1<f32>>().ok()?;
    let values = values.readonly();
    let values = values.as_array();
    Some(values.iter().map(|&v| f64::from(v)).collect())
}

/// A zeroed vector of `n` values, or `MemoryError` if it cannot be allocated.
pub(crate) fn zeroed<T: Clone + Default>(n: usize) -> PyResult<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| PyMemoryError::new_err(format!("no memory for a batch of {n} rows")))?;
    v.resize(n, T::default());
    Ok(v)
}

/// Waits with the GIL released: every wait of a core call goes through here, so no Python
/// thread is ever stopped by a shmreplay call that waits.
struct ReleaseGil<'py>(Python<'py>, Option<Duration>);

impl Blocking for ReleaseGil<'_> {
    fn block(&mut self, wait: &mut (dyn FnMut() + Send)) {
        self.0.detach(wait)
    }

    fn timeout(&self) -> Option<Duration> {
        self.1
    }
}

thread_local! {
    /// The exception a signal handler raised while a core call of this thread was waiting.
    static PENDING_SIGNAL: RefCell<Option<PyErr>> = const { RefCell::new(None) };
}

/// The core's interrupt check: runs Python's signal handlers (Ctrl-C raises KeyboardInterrupt
/// there), keeping what they raised for `to_py`. Core calls poll it every few milliseconds.
pub(crate) fn python_signal_raised() -> bool {
    Python::attach(|py| match py.check_signals() {
        Ok(()) => false,
        Err(e) => {
            PENDING_SIGNAL.with(|pending| *pending.borrow_mut() = Some(e));
            true
        }
    })
}

/// An instance of `shmreplay._errors.<class>(*args)`: shmreplay's own exceptions are defined
/// once, in Python, each also a built-in exception class.
fn shmreplay_error(py: Python<'_>, class: &str, args: Bound<'_, PyTuple>) -> PyErr {
    match py
        .import("shmreplay._errors")
        .and_then(|m| m.getattr(class))
        .and_then(|cls| cls.call1(args))
    {
        Ok(instance) => PyErr::from_value(instance),
        Err(e) => e,
    }
}

/// Maps a core error onto the Python exception a user would expect.
pub(crate) fn to_py(py: Python<'_>, error: Error) -> PyErr {
    let message = error.to_string();
    let ours = |class: &str| match PyTuple::new(py, [message.clone()]) {
        Ok(args) => shmreplay_error(py, class, args),
        Err(e) => e,
    };
    match error {
        Error::InvalidName { .. } | Error::InvalidSchema(_) | Error::InvalidArgument(_) => {
            PyValueError::new_err(message)
        }
        Error::IndexOutOfRange { .. } => PyIndexError::new_err(message),
        Error::AlreadyExists(_) => PyFileExistsError::new_err(message),
        Error::NotFound(_) => PyFileNotFoundError::new_err(message),
        Error::PermissionDenied { .. } => PyPermissionError::new_err(message),
        Error::Corrupt { .. } => ours("CorruptSegmentError"),
        Error::InsufficientSpace { path, needed, free } => {
            let path = path.display().to_string();
            match (message, needed, free, path).into_pyobject(py) {
                Ok(args) => shmreplay_error(py, "InsufficientSpaceError", args),
                Err(e) => e,
            }
        }
        Error::Empty => ours("EmptyBufferError"),
        Error::Contended(_) => ours("ContendedError"),
        Error::TooManyHandles(_) => ours("TooManyHandlesError"),
        Error::WrongSampler(_) => PyTypeError::new_err(message),
        Error::Timeout(_) => PyTimeoutError::new_err(message),
        Error::Shutdown => ours("ShutdownError"),
        Error::Interrupted => PENDING_SIGNAL
            .with(|pending| pending.borrow_mut().take())
            .unwrap_or_else(|| PyKeyboardInterrupt::new_err(message)),
        // OSError(errno, text) becomes FileNotFoundError, PermissionError... as usual.
        Error::Io { context, source } => match source.raw_os_error() {
            Some(errno) => {
                let text = source.to_string();
                let reason = text.split(" (os error").next().unwrap_or(&text);
                PyOSError::new_err((errno, format!("{context}: {reason}")))
            }
            None => PyOSError::new_err(message),
        },
        _ => PyOSError::new_err(message),
    }
}

/// A handle to one shared-memory replay buffer (wrapped by `shmreplay.ReplayBuffer`).
#[pyclass(frozen, module = "shmreplay._core")]
pub(crate) struct RawBuffer {
    inner: Mutex<Option<Arc<ReplayBuffer>>>,
    /// The field names as interned Python strings: `put` looks them up on every call.
    names: Vec<Py<PyString>>,
    /// The segment file and its `(device, inode)`: `unlink` works after `close` too, and
    /// removes only this very segment.
    path: PathBuf,
    file_id: (u64, u64),
}

impl RawBuffer {
    fn new(py: Python<'_>, buffer: ReplayBuffer) -> Self {
        Self::shared(py, Arc::new(buffer))
    }

    /// A handle sharing `buffer` (the ring of an episode buffer).
    pub(crate) fn shared(py: Python<'_>, buffer: Arc<ReplayBuffer>) -> Self {
        let names = buffer
            .schema()
            .fields()
            .iter()
            .map(|f| PyString::intern(py, &f.name).unbind())
            .collect();
        RawBuffer {
            path: buffer.path().to_owned(),
            file_id: buffer.file_id(),
            inner: Mutex::new(Some(buffer)),
            names,
        }
    }

    /// Runs `make` (a create or an attach: file and memory work) without the GIL.
    fn open(
        py: Python<'_>,
        make: impl FnOnce() -> shmreplay_core::Result<ReplayBuffer> + Send,
    ) -> PyResult<RawBuffer> {
        py.detach(make)
            .map(|buffer| RawBuffer::new(py, buffer))
            .map_err(|e| to_py(py, e))
    }

    /// The buffer, or `ValueError` once closed. An `Arc` so that `close` from another thread
    /// never unmaps memory a running copy still uses.
    fn get(&self) -> PyResult<Arc<ReplayBuffer>> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| PyValueError::new_err("operation on a closed ReplayBuffer"))
    }
}

#[pymethods]
impl RawBuffer {
    /// Creates a buffer; `fields` is a list of `(name, dtype code, shape)`, `sampler` None
    /// (uniform), `(alpha, eps, stratified)` or `"queue"`, `limiter` None or `(kind,
    /// samples_per_insert, min_size, min_diff, max_diff)`.
    #[staticmethod]
    #[pyo3(signature = (name, dir, capacity, fields, sampler=None, limiter=None, seed=None,
                        huge_pages=false))]
    #[allow(clippy::too_many_arguments)]
    fn create(
        py: Python<'_>,
        name: &str,
        dir: Option<PathBuf>,
        capacity: u64,
        fields: Vec<(String, String, Vec<usize>)>,
        sampler: Option<SamplerArgs>,
        limiter: Option<LimiterArgs>,
        seed: Option<u64>,
        huge_pages: bool,
    ) -> PyResult<RawBuffer> {
        let sampler = sampler_of(sampler)?;
        let limiter = limiter_of(limiter)?;
        let parsed = fields
            .into_iter()
            .map(|(n, code, shape)| Ok((n, DType::from_code(&code)?, shape)))
            .collect::<shmreplay_core::Result<Vec<_>>>()
            .and_then(|f| Schema::new(&f))
            .map_err(|e| to_py(py, e))?;
        RawBuffer::open(py, || {
            ReplayBuffer::builder(name)
                .dir_opt(dir.as_deref())
                .capacity(capacity)
                .schema(parsed)
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
    ) -> PyResult<RawBuffer> {
        RawBuffer::open(py, || {
            ReplayBuffer::builder(name)
                .dir_opt(dir.as_deref())
                .seed_opt(seed)
                .open()
        })
    }

    #[staticmethod]
    #[pyo3(signature = (name, dir))]
    fn inspect(py: Python<'_>, name: &str, dir: Option<PathBuf>) -> PyResult<RawBuffer> {
        RawBuffer::open(py, || ReplayBuffer::inspect(name, dir.as_deref()))
    }

    #[getter]
    fn name(&self) -> PyResult<String> {
        Ok(self.get()?.name().to_owned())
    }

    #[getter]
    fn path(&self) -> PyResult<PathBuf> {
        Ok(self.get()?.path().to_owned())
    }

    #[getter]
    fn capacity(&self) -> PyResult<u64> {
        Ok(self.get()?.capacity())
    }

    #[getter]
    fn record_bytes(&self) -> PyResult<usize> {
        Ok(self.get()?.record_bytes())
    }

    #[getter]
    fn segment_bytes(&self) -> PyResult<u64> {
        Ok(self.get()?.segment_bytes())
    }

    /// Bytes of this process's mapping on 2 MiB pages (None: unknown).
    fn huge_page_bytes(&self, py: Python<'_>) -> PyResult<Option<u64>> {
        let buffer = self.get()?;
        Ok(py.detach(|| buffer.huge_page_bytes()))
    }

    /// `[(name, dtype code, shape)]` in record order.
    #[getter]
    fn fields(&self) -> PyResult<Vec<(String, &'static str, Vec<usize>)>> {
        Ok(self
            .get()?
            .schema()
            .fields()
            .iter()
            .map(|f| (f.name.clone(), f.dtype.code(), f.shape.clone()))
            .collect())
    }

    /// None (uniform), `(alpha, eps, stratified)` or `"queue"`.
    #[getter]
    fn sampler(&self) -> PyResult<Option<SamplerArgs>> {
        Ok(sampler_args(self.get()?.sampler()))
    }

    /// None or `(kind, samples_per_insert, min_size, min_diff, max_diff)`.
    #[getter]
    fn limiter(&self) -> PyResult<Option<LimiterArgs>> {
        Ok(limiter_args(self.get()?.limiter()))
    }

    /// None, or an episode buffer's `(observations, reward, frame_stack, padding, n_step,
    /// gamma)`.
    #[getter]
    fn episodes(&self) -> PyResult<Option<episodes::EpisodeArgs>> {
        Ok(self.get()?.episodes().map(episodes::episode_args))
    }

    /// Whether `sample(n)` would proceed now without waiting.
    fn can_sample(&self, py: Python<'_>, n: u64) -> PyResult<bool> {
        let buffer = self.get()?;
        Ok(py.detach(|| buffer.can_sample(n)))
    }

    /// Whether an insert of `k` rows would proceed now without waiting.
    fn can_insert(&self, py: Python<'_>, k: u64) -> PyResult<bool> {
        let buffer = self.get()?;
        Ok(py.detach(|| buffer.can_insert(k)))
    }

    /// Seeds this handle's random draws (see `ReplayBuffer::reseed`).
    fn reseed(&self, seed: u64) -> PyResult<()> {
        self.get()?.reseed(seed);
        Ok(())
    }

    /// Makes every waiting call (in every process) fail with `ShutdownError`.
    fn shutdown(&self) -> PyResult<()> {
        self.get()?.shutdown();
        Ok(())
    }

    /// `(I, S, D)`: the flow-control counters.
    fn flow_counts(&self) -> PyResult<(u64, u64, u64)> {
        let c = self.get()?.flow_counts();
        Ok((c.inserts, c.samples, c.deletes))
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
    }

    fn __len__(&self) -> PyResult<usize> {
        Ok(self.get()?.len() as usize)
    }

    /// Inserts rows given as one C-contiguous array per field (already of the field's dtype),
    /// with float64 raw priorities (one per row, or one for all) or none.
    #[pyo3(signature = (columns, priorities=None, timeout=None))]
    fn extend(
        &self,
        py: Python<'_>,
        columns: Vec<Bound<'_, PyUntypedArray>>,
        priorities: Option<PyReadonlyArray1<'_, f64>>,
        timeout: Option<f64>,
    ) -> PyResult<usize> {
        let buffer = self.get()?;
        let columns = inputs(&columns)?;
        let priorities = priorities.map(|p| p.to_vec()).transpose()?;
        let timeout = timeout_of(timeout)?;
        py.detach(|| {
            buffer.extend_columns_with_priorities(
                &columns,
                priorities.as_deref(),
                &mut WaitUpTo(timeout),
            )
        })
        .map_err(|e| to_py(py, e))
    }

    /// The fast path of `add` (`rows=None`) and `extend` (`rows=N`): inserts `values` and
    /// returns True if every value is an array of its field's shape or a scalar whose dtype
    /// converts to the field's under numpy's `same_kind` rule with every value fitting (see
    /// `rows.rs`); otherwise returns False and writes nothing.
    #[pyo3(signature = (values, rows=None, priorities=None, timeout=None))]
    fn put(
        &self,
        py: Python<'_>,
        values: &Bound<'_, PyDict>,
        rows: Option<usize>,
        priorities: Option<PyReadonlyArray1<'_, f64>>,
        timeout: Option<f64>,
    ) -> PyResult<bool> {
        let buffer = self.get()?;
        let timeout = timeout_of(timeout)?;
        let mut arrays = Vec::new();
        let Some(columns) = rows::columns(buffer.schema(), &self.names, values, rows, &mut arrays)
        else {
            return Ok(false);
        };
        let columns: Vec<_> = columns.iter().map(|c| c.input()).collect();
        let priorities = priorities.as_ref().map(|p| p.as_slice()).transpose()?;
        // Small inserts are quicker than releasing and retaking the GIL; they release it only
        // if they have to wait (for another thread on this handle, or a slot's writer).
        let inserted = if columns.iter().map(|c| c.len()).sum::<usize>() < 64 << 10 {
            buffer.extend_columns_with_priorities(
                &columns,
                priorities,
                &mut ReleaseGil(py, timeout),
            )
        } else {
            let priorities = priorities.map(<[f64]>::to_vec);
            py.detach(|| {
                buffer.extend_columns_with_priorities(
                    &columns,
                    priorities.as_deref(),
                    &mut WaitUpTo(timeout),
                )
            })
        };
        inserted.map(|_| true).map_err(|e| to_py(py, e))
    }

    /// Fills one fresh array per field with a batch (uniform, or a queue's next rows);
    /// returns uint64 `(index, key)`.
    #[pyo3(signature = (out, batch_size, timeout=None))]
    fn sample_into<'py>(
        &self,
        py: Python<'py>,
        out: Vec<Bound<'py, PyUntypedArray>>,
        batch_size: usize,
        timeout: Option<f64>,
    ) -> PyResult<(U64Array<'py>, U64Array<'py>)> {
        let buffer = self.get()?;
        let out = outputs(&out)?;
        let (mut index, mut key) = (zeroed(batch_size)?, zeroed(batch_size)?);
        let timeout = timeout_of(timeout)?;
        py.detach(|| buffer.sample_columns(&out, &mut index, &mut key, &mut WaitUpTo(timeout)))
            .map_err(|e| to_py(py, e))?;
        Ok((PyArray1::from_vec(py, index), PyArray1::from_vec(py, key)))
    }

    /// Fills one fresh array per field with a batch drawn by priority; returns `(index, key,
    /// probability, weight, priority)`.
    #[allow(clippy::type_complexity)]
    #[pyo3(signature = (out, batch_size, beta, timeout=None))]
    fn sample_prioritized_into<'py>(
        &self,
        py: Python<'py>,
        out: Vec<Bound<'py, PyUntypedArray>>,
        batch_size: usize,
        beta: f64,
        timeout: Option<f64>,
    ) -> PyResult<(
        U64Array<'py>,
        U64Array<'py>,
        F64Array<'py>,
        F32Array<'py>,
        F64Array<'py>,
    )> {
        let buffer = self.get()?;
        let out = outputs(&out)?;
        let (mut index, mut key) = (zeroed(batch_size)?, zeroed(batch_size)?);
        let (mut probability, mut weight, mut priority) = (
            zeroed(batch_size)?,
            zeroed(batch_size)?,
            zeroed(batch_size)?,
        );
        let timeout = timeout_of(timeout)?;
        py.detach(|| {
            let info = PriorityOutputs {
                probability: &mut probability,
                weight: &mut weight,
                priority: &mut priority,
            };
            buffer.sample_prioritized_columns(
                &out,
                &mut index,
                &mut key,
                info,
                beta,
                &mut WaitUpTo(timeout),
            )
        })
        .map_err(|e| to_py(py, e))?;
        Ok((
            PyArray1::from_vec(py, index),
            PyArray1::from_vec(py, key),
            PyArray1::from_vec(py, probability),
            PyArray1::from_vec(py, weight),
            PyArray1::from_vec(py, priority),
        ))
    }

    /// Sets the raw priorities of records `keys` (a 1-d uint64 or int64 array) to
    /// `priorities` (a 1-d float64 or float32 array); returns how many distinct keys applied,
    /// or None, doing nothing, for arrays of other kinds (the package converts those).
    fn update_priorities(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        priorities: &Bound<'_, PyAny>,
    ) -> PyResult<Option<usize>> {
        let buffer = self.get()?;
        let (Some(keys), Some(priorities)) = (key_vector(keys)?, float_vector(priorities)) else {
            return Ok(None);
        };
        py.detach(|| buffer.update_priorities(&keys, &priorities, &mut shmreplay_core::NoBlocking))
            .map(Some)
            .map_err(|e| to_py(py, e))
    }

    /// The raw priorities of records `keys` (NaN where overwritten).
    fn priorities<'py>(
        &self,
        py: Python<'py>,
        keys: PyReadonlyArray1<'py, u64>,
    ) -> PyResult<F64Array<'py>> {
        let buffer = self.get()?;
        let keys = keys.to_vec()?;
        let mut out = zeroed(keys.len())?;
        py.detach(|| buffer.priorities(&keys, &mut out))
            .map_err(|e| to_py(py, e))?;
        Ok(PyArray1::from_vec(py, out))
    }

    /// `(v_max, resolution)` of a prioritized buffer's fixed point, None for a uniform one.
    fn priority_range(&self) -> PyResult<Option<(f64, f64)>> {
        Ok(self.get()?.priority_range())
    }

    /// Copies slot `index` into one array per field; returns its key, or None if never written.
    fn read(
        &self,
        py: Python<'_>,
        index: u64,
        out: Vec<Bound<'_, PyUntypedArray>>,
    ) -> PyResult<Option<u64>> {
        let buffer = self.get()?;
        let out = outputs(&out)?;
        py.detach(|| buffer.read_columns(index, &out, &mut shmreplay_core::NoBlocking))
            .map_err(|e| to_py(py, e))
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let buffer = self.get()?;
        let (stats, priority) = py.detach(|| (buffer.stats(), buffer.priority_stats()));
        let dict = PyDict::new(py);
        for (key, value) in stats.items() {
            dict.set_item(key, value)?;
        }
        if let Some(priority) = priority {
            dict.set_item("priority_total", priority.total)?;
            dict.set_item("max_priority", priority.max_priority)?;
        }
        Ok(dict)
    }

    fn processes(&self, py: Python<'_>) -> PyResult<Vec<u32>> {
        let buffer = self.get()?;
        Ok(py.detach(|| buffer.processes()))
    }

    /// Removes the segment this handle mapped (also after `close`); `FileNotFoundError` if it
    /// is gone or its name now belongs to another buffer, which is left alone.
    fn unlink(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| shmreplay_core::remove_segment(&self.path, self.file_id))
            .map_err(|e| to_py(py, e))
    }

    /// Releases this handle; the mapping goes once no running call uses it. Idempotent.
    fn close(&self) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// `(buffers, unreadable)` in `dir`: `[{name, path, capacity, size, bytes, record_bytes,
/// attached, creator_pid, stale}]` and `[{name, path, reason}]`.
#[pyfunction]
#[pyo3(signature = (dir=None))]
#[allow(clippy::type_complexity)]
fn scan<'py>(
    py: Python<'py>,
    dir: Option<PathBuf>,
) -> PyResult<(Vec<Bound<'py, PyDict>>, Vec<Bound<'py, PyDict>>)> {
    let listing = py
        .detach(|| shmreplay_core::list(dir.as_deref()))
        .map_err(|e| to_py(py, e))?;
    let buffers = listing
        .buffers
        .into_iter()
        .map(|info| {
            let dict = PyDict::new(py);
            dict.set_item("name", info.name)?;
            dict.set_item("path", info.path.display().to_string())?;
            dict.set_item("capacity", info.capacity)?;
            dict.set_item("size", info.size)?;
            dict.set_item("bytes", info.bytes)?;
            dict.set_item("record_bytes", info.record_bytes)?;
            dict.set_item("attached", info.attached)?;
            dict.set_item("creator_pid", info.creator_pid)?;
            dict.set_item("stale", info.stale)?;
            dict.set_item("sampler", sampler_args(info.sampler))?;
            dict.set_item("kind", if info.episodes { "episodes" } else { "ring" })?;
            Ok(dict)
        })
        .collect::<PyResult<_>>()?;
    let unreadable = listing
        .unreadable
        .into_iter()
        .map(|file| {
            let dict = PyDict::new(py);
            dict.set_item("name", file.name)?;
            dict.set_item("path", file.path.display().to_string())?;
            dict.set_item("reason", file.reason)?;
            Ok(dict)
        })
        .collect::<PyResult<_>>()?;
    Ok((buffers, unreadable))
}

/// Removes the stale buffers in `dir` (only names them with `dry_run`); returns their names.
#[pyfunction]
#[pyo3(signature = (dir=None, dry_run=false))]
fn remove_stale(py: Python<'_>, dir: Option<PathBuf>, dry_run: bool) -> PyResult<Vec<String>> {
    py.detach(|| shmreplay_core::remove_stale(dir.as_deref(), dry_run))
        .map_err(|e| to_py(py, e))
}

#[pyfunction]
#[pyo3(signature = (name, dir=None))]
fn remove(py: Python<'_>, name: &str, dir: Option<PathBuf>) -> PyResult<()> {
    shmreplay_core::remove(name, dir.as_deref()).map_err(|e| to_py(py, e))
}

/// The copy kernels of this process: which this CPU can run, which one the environment forced
/// (`SHMREPLAY_COPY_KERNEL`), and which each range size gets. For benchmark reports.
#[pyfunction]
fn kernels(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let dict = PyDict::new(py);
    for (key, value) in shmreplay_core::copy::describe() {
        dict.set_item(key, value)?;
    }
    Ok(dict)
}

#[pyfunction]
fn unique_name() -> String {
    shmreplay_core::unique_name()
}

#[pyfunction]
fn validate_name(py: Python<'_>, name: &str) -> PyResult<()> {
    shmreplay_core::validate_name(name).map_err(|e| to_py(py, e))
}

/// Test hook (cargo feature `test-hooks`): `extend`, calling `on_pause(slot)` (with the GIL)
/// at `stage` of the first row written ("copy": after half its record bytes were stored;
/// "count": after its commit, before it is counted), while the slot is still the writer's.
#[cfg(feature = "test-hooks")]
#[pyfunction]
fn _test_extend_pausing(
    py: Python<'_>,
    raw: &RawBuffer,
    columns: Vec<Bound<'_, PyUntypedArray>>,
    on_pause: Py<PyAny>,
    stage: &str,
) -> PyResult<usize> {
    let at = match stage {
        "copy" => shmreplay_core::PauseAt::Copy,
        "count" => shmreplay_core::PauseAt::Count,
        other => {
            return Err(PyValueError::new_err(format!(
                "stage must be 'copy' or 'count', got {other:?}"
            )))
        }
    };
    let buffer = raw.get()?;
    let columns = inputs(&columns)?;
    let mut pause = |slot: u64| {
        Python::attach(|py| {
            if let Err(e) = on_pause.call1(py, (slot,)) {
                e.restore(py);
            }
        })
    };
    let inserted = py.detach(|| buffer.extend_pausing(&columns, at, &mut pause));
    if let Some(e) = PyErr::take(py) {
        return Err(e);
    }
    inserted.map_err(|e| to_py(py, e))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    shmreplay_core::interrupt::set_check(python_signal_raised);
    m.add_class::<RawBuffer>()?;
    m.add_class::<episodes::RawEpisodes>()?;
    m.add_class::<episodes::RawEpisodeWriter>()?;
    m.add_function(wrap_pyfunction!(scan, m)?)?;
    m.add_function(wrap_pyfunction!(remove_stale, m)?)?;
    m.add_function(wrap_pyfunction!(remove, m)?)?;
    m.add_function(wrap_pyfunction!(unique_name, m)?)?;
    m.add_function(wrap_pyfunction!(kernels, m)?)?;
    m.add_function(wrap_pyfunction!(validate_name, m)?)?;
    #[cfg(feature = "test-hooks")]
    m.add_function(wrap_pyfunction!(_test_extend_pausing, m)?)?;
    m.add("DEFAULT_DIR", shmreplay_core::DEFAULT_DIR)?;
    m.add("MAX_CAPACITY", shmreplay_core::MAX_CAPACITY)?;
    m.add("HUGE_PAGE_BYTES", shmreplay_core::huge_page_size())?;
    m.add("MAX_EPISODE_WINDOW", shmreplay_core::MAX_EPISODE_WINDOW)?;
    m.add("MAX_NAME_LEN", shmreplay_core::MAX_NAME_LEN)?;
    Ok(())
}
