//! `shmreplay._core`: a thin PyO3 layer over `shmreplay-core`.
//!
//! Argument checking that needs numpy semantics (dtype casting, shapes) happens in the Python
//! package; this layer checks again what memory safety depends on (contiguity, byte counts,
//! writability) and releases the GIL around every copy and every wait.

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use numpy::PyUntypedArray;
use pyo3::exceptions::{
    PyFileExistsError, PyFileNotFoundError, PyIndexError, PyKeyboardInterrupt, PyOSError,
    PyPermissionError, PyRuntimeError, PyTimeoutError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};
use shmreplay_core::{DType, Error, ReplayBuffer, Schema};

mod arrays;
mod rows;

use arrays::{as_u64s, input_bytes, output_bytes};

thread_local! {
    /// The exception a signal handler raised while a core call of this thread was waiting.
    static PENDING_SIGNAL: RefCell<Option<PyErr>> = const { RefCell::new(None) };
}

/// The core's interrupt check: runs Python's signal handlers (Ctrl-C raises KeyboardInterrupt
/// there), keeping what they raised for `to_py`. Core calls poll it every few milliseconds.
fn python_signal_raised() -> bool {
    Python::attach(|py| match py.check_signals() {
        Ok(()) => false,
        Err(e) => {
            PENDING_SIGNAL.with(|pending| *pending.borrow_mut() = Some(e));
            true
        }
    })
}

/// Maps a core error onto the Python exception a user would expect.
fn to_py(py: Python<'_>, error: Error) -> PyErr {
    let message = error.to_string();
    let from_errors = |class: &str, args: Bound<'_, pyo3::types::PyTuple>| -> PyErr {
        match py
            .import("shmreplay._errors")
            .and_then(|m| m.getattr(class))
            .and_then(|cls| cls.call1(args))
        {
            Ok(instance) => PyErr::from_value(instance),
            Err(e) => e,
        }
    };
    match error {
        Error::InvalidName { .. } | Error::InvalidSchema(_) | Error::InvalidArgument(_) => {
            PyValueError::new_err(message)
        }
        Error::AlreadyExists(_) => PyFileExistsError::new_err(message),
        Error::NotFound(_) => PyFileNotFoundError::new_err(message),
        Error::PermissionDenied { .. } => PyPermissionError::new_err(message),
        Error::Corrupt { .. } => match pyo3::types::PyTuple::new(py, [message.clone()]) {
            Ok(args) => from_errors("CorruptSegmentError", args),
            Err(e) => e,
        },
        Error::InsufficientSpace { path, needed, free } => {
            let path = path.display().to_string();
            match (message, needed, free, path).into_pyobject(py) {
                Ok(args) => from_errors("InsufficientSpaceError", args),
                Err(e) => e,
            }
        }
        Error::Empty => match pyo3::types::PyTuple::new(py, [message]) {
            Ok(args) => from_errors("EmptyBufferError", args),
            Err(e) => e,
        },
        Error::Contended(_) => PyTimeoutError::new_err(message),
        Error::Interrupted => PENDING_SIGNAL
            .with(|pending| pending.borrow_mut().take())
            .unwrap_or_else(|| PyKeyboardInterrupt::new_err(message)),
        Error::TooManyHandles(_) => PyRuntimeError::new_err(message),
        // OSError(errno, text) becomes FileNotFoundError, PermissionError... as usual.
        Error::Io { context, source } => match source.raw_os_error() {
            Some(errno) => {
                let text = source.to_string();
                let reason = text.split(" (os error").next().unwrap_or(&text);
                PyOSError::new_err((errno, format!("{context}: {reason}")))
            }
            None => PyOSError::new_err(message),
        },
    }
}

/// A handle to one shared-memory replay buffer (wrapped by `shmreplay.ReplayBuffer`).
#[pyclass(frozen, module = "shmreplay._core")]
struct RawBuffer {
    inner: Mutex<Option<Arc<ReplayBuffer>>>,
    /// The field names as interned Python strings: `put` looks them up on every call.
    names: Vec<Py<PyString>>,
}

impl RawBuffer {
    fn new(py: Python<'_>, buffer: ReplayBuffer) -> Self {
        let names = buffer
            .schema()
            .fields()
            .iter()
            .map(|f| PyString::intern(py, &f.name).unbind())
            .collect();
        RawBuffer {
            inner: Mutex::new(Some(Arc::new(buffer))),
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
    /// Creates a buffer; `fields` is a list of `(name, dtype code, shape)`.
    #[staticmethod]
    #[pyo3(signature = (name, dir, capacity, fields))]
    fn create(
        py: Python<'_>,
        name: &str,
        dir: Option<PathBuf>,
        capacity: u64,
        fields: Vec<(String, String, Vec<usize>)>,
    ) -> PyResult<RawBuffer> {
        let parsed = fields
            .into_iter()
            .map(|(n, code, shape)| Ok((n, DType::from_code(&code)?, shape)))
            .collect::<shmreplay_core::Result<Vec<_>>>()
            .and_then(|f| Schema::new(&f))
            .map_err(|e| to_py(py, e))?;
        RawBuffer::open(py, || {
            ReplayBuffer::create(name, dir.as_deref(), capacity, parsed)
        })
    }

    #[staticmethod]
    #[pyo3(signature = (name, dir))]
    fn attach(py: Python<'_>, name: &str, dir: Option<PathBuf>) -> PyResult<RawBuffer> {
        RawBuffer::open(py, || ReplayBuffer::attach(name, dir.as_deref()))
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

    /// Inserts rows given as one C-contiguous array per field (already of the field's dtype).
    fn extend(&self, py: Python<'_>, columns: Vec<Bound<'_, PyUntypedArray>>) -> PyResult<usize> {
        let buffer = self.get()?;
        let columns = input_bytes(&columns)?;
        py.detach(|| buffer.extend(&columns))
            .map_err(|e| to_py(py, e))
    }

    /// The fast path of `add` (`rows=None`) and `extend` (`rows=N`): inserts `values` and
    /// returns True if every value is an array of its field's exact dtype and shape or a Python
    /// scalar its field holds exactly; otherwise returns False and writes nothing.
    #[pyo3(signature = (values, rows=None))]
    fn put(
        &self,
        py: Python<'_>,
        values: &Bound<'_, PyDict>,
        rows: Option<usize>,
    ) -> PyResult<bool> {
        let buffer = self.get()?;
        let mut arrays = Vec::new();
        let Some(columns) = rows::columns(buffer.schema(), &self.names, values, rows, &mut arrays)
        else {
            return Ok(false);
        };
        let columns: Vec<&[u8]> = columns.iter().map(|c| c.bytes()).collect();
        // Small inserts are quicker than releasing and retaking the GIL.
        let inserted = if columns.iter().map(|c| c.len()).sum::<usize>() < 64 << 10 {
            buffer.extend(&columns)
        } else {
            py.detach(|| buffer.extend(&columns))
        };
        inserted.map(|_| true).map_err(|e| to_py(py, e))
    }

    /// Test hook: `extend`, calling `on_pause(slot)` (with the GIL) after the first field of the
    /// first row is copied, while the slot is still claimed; a test kills the writer there.
    fn extend_pausing(
        &self,
        py: Python<'_>,
        columns: Vec<Bound<'_, PyUntypedArray>>,
        on_pause: Py<PyAny>,
    ) -> PyResult<usize> {
        let buffer = self.get()?;
        let columns = input_bytes(&columns)?;
        let mut pause = |slot: u64| {
            Python::attach(|py| {
                if let Err(e) = on_pause.call1(py, (slot,)) {
                    e.restore(py);
                }
            })
        };
        let inserted = py.detach(|| buffer.extend_pausing(&columns, &mut pause));
        if let Some(e) = PyErr::take(py) {
            return Err(e);
        }
        inserted.map_err(|e| to_py(py, e))
    }

    /// Fills one fresh array per field plus uint64 `index` and `key` arrays with a random batch.
    fn sample_into(
        &self,
        py: Python<'_>,
        out: Vec<Bound<'_, PyUntypedArray>>,
        index: Bound<'_, PyUntypedArray>,
        key: Bound<'_, PyUntypedArray>,
    ) -> PyResult<()> {
        let buffer = self.get()?;
        let mut all = out;
        all.extend([index, key]);
        let mut out = output_bytes(&all)?;
        let key = as_u64s(out.pop().expect("key"))?;
        let index = as_u64s(out.pop().expect("index"))?;
        py.detach(|| buffer.sample_into(&mut out, index, key))
            .map_err(|e| to_py(py, e))
    }

    /// Copies slot `index` into one array per field; returns its key, or None if never written.
    fn read(
        &self,
        py: Python<'_>,
        index: u64,
        out: Vec<Bound<'_, PyUntypedArray>>,
    ) -> PyResult<Option<u64>> {
        let buffer = self.get()?;
        let mut out = output_bytes(&out)?;
        py.detach(|| buffer.read(index, &mut out))
            .map_err(|e| match e {
                Error::InvalidArgument(m) if index >= buffer.capacity() => PyIndexError::new_err(m),
                e => to_py(py, e),
            })
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let buffer = self.get()?;
        let s = py.detach(|| buffer.stats());
        let dict = PyDict::new(py);
        for (key, value) in [
            ("capacity", s.capacity),
            ("size", s.size),
            ("inserts", s.inserts),
            ("samples", s.samples),
            ("retries", s.retries),
            ("recovered", s.recovered),
            ("superseded", s.superseded),
            ("attached", s.attached),
        ] {
            dict.set_item(key, value)?;
        }
        Ok(dict)
    }

    fn processes(&self, py: Python<'_>) -> PyResult<Vec<u32>> {
        let buffer = self.get()?;
        Ok(py.detach(|| buffer.processes()))
    }

    fn unlink(&self, py: Python<'_>) -> PyResult<()> {
        self.get()?.unlink().map_err(|e| to_py(py, e))
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

#[pyfunction]
fn unique_name() -> String {
    shmreplay_core::unique_name()
}

#[pyfunction]
fn validate_name(py: Python<'_>, name: &str) -> PyResult<()> {
    shmreplay_core::validate_name(name).map_err(|e| to_py(py, e))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    shmreplay_core::interrupt::set_check(python_signal_raised);
    m.add_class::<RawBuffer>()?;
    m.add_function(wrap_pyfunction!(scan, m)?)?;
    m.add_function(wrap_pyfunction!(remove_stale, m)?)?;
    m.add_function(wrap_pyfunction!(remove, m)?)?;
    m.add_function(wrap_pyfunction!(unique_name, m)?)?;
    m.add_function(wrap_pyfunction!(validate_name, m)?)?;
    m.add("DEFAULT_DIR", shmreplay_core::DEFAULT_DIR)?;
    m.add("MAX_CAPACITY", shmreplay_core::MAX_CAPACITY)?;
    m.add("MAX_NAME_LEN", shmreplay_core::MAX_NAME_LEN)?;
    Ok(())
}
