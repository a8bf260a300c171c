//! Streaming Parquet output: Arrow builders flushed into an `ArrowWriter` in batches, so a
//! site's memory stays bounded by one row group per table.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch};
use arrow::datatypes::SchemaRef;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::SortingColumn;
use parquet::file::properties::WriterProperties;

use crate::SynthError;

/// Rows buffered in the builders before they are handed to the Parquet writer.
const BATCH_ROWS: usize = 64 * 1024;
/// Rows per Parquet row group.
const ROW_GROUP_ROWS: usize = 128 * 1024;

/// A set of Arrow builders for one table, in catalog column order.
pub(crate) trait Columns {
    /// Rows appended since the last `finish`.
    fn len(&self) -> usize;
    /// Finish every builder (resetting it) and return the arrays.
    fn finish(&mut self) -> Vec<ArrayRef>;
}

/// One table's Parquet file being written.
pub(crate) struct TableSink<C: Columns> {
    pub cols: C,
    writer: ArrowWriter<BufWriter<File>>,
    schema: SchemaRef,
    path: PathBuf,
    rows: usize,
}

fn props() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        // Files are written grouped by the privacy unit, which is always column 0.
        .set_sorting_columns(Some(vec![SortingColumn {
            column_idx: 0,
            descending: false,
            nulls_first: false,
        }]))
        .build()
}

impl<C: Columns> TableSink<C> {
    pub(crate) fn create(path: &Path, schema: SchemaRef, cols: C) -> Result<Self, SynthError> {
        let file = File::create(path).map_err(|source| SynthError::Write {
            path: path.to_path_buf(),
            source,
        })?;
        let writer = ArrowWriter::try_new(
            BufWriter::with_capacity(1 << 20, file),
            schema.clone(),
            Some(props()),
        )
        .map_err(|source| SynthError::Parquet {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(TableSink {
            cols,
            writer,
            schema,
            path: path.to_path_buf(),
            rows: 0,
        })
    }

    /// Hand the buffered rows to the writer once enough have accumulated.
    pub(crate) fn maybe_flush(&mut self) -> Result<(), SynthError> {
        if self.cols.len() >= BATCH_ROWS {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SynthError> {
        let n = self.cols.len();
        if n == 0 {
            return Ok(());
        }
        let batch =
            RecordBatch::try_new(self.schema.clone(), self.cols.finish()).map_err(|source| {
                SynthError::Arrow {
                    path: self.path.clone(),
                    source,
                }
            })?;
        self.writer
            .write(&batch)
            .map_err(|source| SynthError::Parquet {
                path: self.path.clone(),
                source,
            })?;
        self.rows += n;
        Ok(())
    }

    /// Write the remaining rows and the footer; returns the number of rows written.
    pub(crate) fn close(mut self) -> Result<usize, SynthError> {
        self.flush()?;
        let path = self.path;
        let mut inner = self
            .writer
            .into_inner()
            .map_err(|source| SynthError::Parquet {
                path: path.clone(),
                source,
            })?;
        inner
            .flush()
            .map_err(|source| SynthError::Write { path, source })?;
        Ok(self.rows)
    }
}

/// Shorthand for boxing a finished array.
pub(crate) fn arr<A: arrow::array::Array + 'static>(a: A) -> ArrayRef {
    Arc::new(a)
}
