// Dataset index builders for data_pipeline (compiled into data_pipeline._helpers by setup.py).
//
// Two builders, both output-identical to megatron-core's helpers_cpp so that an Apogee run
// reads the same samples as a Megatron run over the same files:
//
//   build_sample_idx_int32 / build_sample_idx_int64
//       Walks the (shuffled) document stream and records where every sample of
//       seq_length + extra tokens starts: a [num_samples + 1, 2] array of
//       (position in document_idx, token offset inside that document). Sample i spans
//       from row i to row i + 1 (inclusive of `extra` tokens past row i + 1's offset, which
//       is how consecutive samples share one boundary token).
//
//   build_blending_indices / build_blending_indices_from
//       Greedy weighted interleaving: at every position pick the dataset that is furthest
//       behind its target share, weight * max(position, 1) - drawn_so_far (ties go to the
//       lowest dataset id). The `_from` variant is for phase schedules: the interleave of a
//       phase depends only on that phase's weights (positions and shares restart at 0), while
//       every dataset's sample ids continue from its cursor, so nothing is replayed when the
//       mix changes. The cursors are returned updated. Datasets of weight 0 are never drawn.
//
// The GIL is released while the loops run so a prefetching thread is never blocked by them.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

// Number of samples the token stream yields. Megatron computes the "keep the last partial
// sample" count through a 32-bit float division; it is reproduced here on purpose so both
// engines agree on the sample count even where float rounding bites.
int64_t count_samples(int64_t total_tokens, int32_t seq_length, bool drop_last, int32_t extra) {
  const int64_t usable = total_tokens - extra;
  if (drop_last) return usable / seq_length;
  return static_cast<int64_t>(std::ceil(static_cast<float>(usable) / seq_length));
}

template <typename Index>
py::array_t<Index> build_sample_idx(const py::array_t<int32_t, py::array::c_style> &sizes,
                                    const py::array_t<int32_t, py::array::c_style> &document_idx,
                                    int32_t seq_length, int32_t num_epochs,
                                    int64_t tokens_per_epoch, bool drop_last_partial_sequence,
                                    int add_extra_token_to_sequence) {
  if (seq_length <= 1) throw std::invalid_argument("seq_length must be > 1, got " + std::to_string(seq_length));
  if (num_epochs <= 0) throw std::invalid_argument("num_epochs must be > 0, got " + std::to_string(num_epochs));
  if (tokens_per_epoch <= 1) throw std::invalid_argument("tokens_per_epoch must be > 1");
  if (sizes.ndim() != 1 || document_idx.ndim() != 1) throw std::invalid_argument("sizes and document_idx must be 1-D");

  const int32_t extra = add_extra_token_to_sequence;
  const int64_t num_samples = count_samples(static_cast<int64_t>(num_epochs) * tokens_per_epoch,
                                            seq_length, drop_last_partial_sequence, extra);
  const int64_t num_docs = document_idx.shape(0);
  const int64_t num_sizes = sizes.shape(0);
  if (num_samples < 0 || num_docs == 0) throw std::invalid_argument("no samples can be built");

  auto result = py::array_t<Index>({num_samples + 1, static_cast<int64_t>(2)});
  Index *out = result.mutable_data();
  const int32_t *size_of = sizes.data();
  const int32_t *docs = document_idx.data();
  bool bad_document = false;
  {
    py::gil_scoped_release release;
    int64_t doc_pos = 0;  // position in the document stream
    int64_t offset = 0;   // tokens of docs[doc_pos] already consumed
    out[0] = 0;
    out[1] = 0;
    for (int64_t row = 1; row <= num_samples && !bad_document; ++row) {
      // Each sample needs seq_length + extra tokens, but its last `extra` tokens are the
      // first tokens of the next sample, so the cursor advances by seq_length.
      int64_t needed = seq_length + extra;
      while (needed > 0) {
        const int64_t doc = docs[doc_pos];
        if (doc < 0 || doc >= num_sizes) { bad_document = true; break; }
        const int64_t left_in_doc = size_of[doc] - offset;
        if (left_in_doc >= needed) {
          offset += needed - extra;
          break;
        }
        needed -= left_in_doc;
        if (doc_pos == num_docs - 1) {
          // The stream ran out: the final (partial) sample ends at the last document's end.
          offset = size_of[doc] - extra;
          break;
        }
        ++doc_pos;
        offset = 0;
      }
      out[2 * row] = static_cast<Index>(doc_pos);
      out[2 * row + 1] = static_cast<Index>(offset);
    }
  }
  if (bad_document) throw std::out_of_range("document_idx holds an id outside [0, len(sizes))");
  return result;
}

// Greedy interleave of `size` positions; sample ids start at `cursors` (advanced in place).
// With skip_zero_weights, datasets of weight 0 are never drawn. Megatron's rule does draw one
// at position 1 (max(position, 1) makes positions 0 and 1 share a target, and the tie goes to
// the lowest id), so the Megatron-compatible entry point keeps that behaviour.
void blend_greedy(int16_t *dataset_index, int64_t *dataset_sample_index, const double *weights,
                  int64_t *cursors, int64_t num_datasets, int64_t size, bool skip_zero_weights) {
  std::vector<int64_t> counts(num_datasets, 0);  // drawn in this call: the greedy's state
  int64_t first = 0;
  while (skip_zero_weights && first + 1 < num_datasets && !(weights[first] > 0.0)) ++first;
  for (int64_t position = 0; position < size; ++position) {
    const double scale = std::max(static_cast<double>(position), 1.0);
    int64_t best = first;
    double best_deficit = weights[first] * scale - static_cast<double>(counts[first]);
    for (int64_t d = first + 1; d < num_datasets; ++d) {
      if (skip_zero_weights && !(weights[d] > 0.0)) continue;
      const double deficit = weights[d] * scale - static_cast<double>(counts[d]);
      if (deficit > best_deficit) {  // strict: ties stay with the lower dataset id
        best_deficit = deficit;
        best = d;
      }
    }
    dataset_index[position] = static_cast<int16_t>(best);
    dataset_sample_index[position] = cursors[best] + counts[best];
    ++counts[best];
  }
  for (int64_t d = 0; d < num_datasets; ++d) cursors[d] += counts[d];
}

void check_blend_args(const py::array &dataset_index, const py::array &dataset_sample_index,
                      const py::array &weights, int64_t num_datasets, int64_t size) {
  if (num_datasets <= 0 || num_datasets > 32767) throw std::invalid_argument("num_datasets must be in [1, 32767]");
  if (weights.shape(0) < num_datasets) throw std::invalid_argument("weights has fewer entries than num_datasets");
  if (dataset_index.shape(0) < size || dataset_sample_index.shape(0) < size)
    throw std::invalid_argument("output arrays are shorter than size");
}

// Same signature and output as megatron-core's build_blending_indices.
void build_blending_indices(py::array_t<int16_t, py::array::c_style> &dataset_index,
                            py::array_t<int64_t, py::array::c_style> &dataset_sample_index,
                            const py::array_t<double, py::array::c_style> &weights,
                            int32_t num_datasets, int64_t size, bool /*verbose*/) {
  check_blend_args(dataset_index, dataset_sample_index, weights, num_datasets, size);
  std::vector<int64_t> counts(num_datasets, 0);
  int16_t *di = dataset_index.mutable_data();
  int64_t *dsi = dataset_sample_index.mutable_data();
  const double *w = weights.data();
  py::gil_scoped_release release;
  blend_greedy(di, dsi, w, counts.data(), num_datasets, size, false);
}

// Phase-aware variant: `counts` holds every dataset's sample cursor on entry and on exit.
void build_blending_indices_from(py::array_t<int16_t, py::array::c_style> &dataset_index,
                                 py::array_t<int64_t, py::array::c_style> &dataset_sample_index,
                                 const py::array_t<double, py::array::c_style> &weights,
                                 py::array_t<int64_t, py::array::c_style> &counts) {
  const int64_t num_datasets = weights.shape(0);
  const int64_t size = dataset_index.shape(0);
  check_blend_args(dataset_index, dataset_sample_index, weights, num_datasets, size);
  if (counts.shape(0) != num_datasets) throw std::invalid_argument("counts needs one entry per dataset");
  int16_t *di = dataset_index.mutable_data();
  int64_t *dsi = dataset_sample_index.mutable_data();
  const double *w = weights.data();
  int64_t *c = counts.mutable_data();
  py::gil_scoped_release release;
  blend_greedy(di, dsi, w, c, num_datasets, size, true);
}

}  // namespace

PYBIND11_MODULE(_helpers, m) {
  m.doc() = "Apogee dataset index builders (sample index, blending index); output-identical to megatron-core's helpers_cpp.";
  m.def("build_sample_idx_int32", &build_sample_idx<int32_t>,
        "[N+1, 2] int32 (document-stream position, offset) of every sample start.",
        py::arg("sizes"), py::arg("document_idx"), py::arg("seq_length"), py::arg("num_epochs"),
        py::arg("tokens_per_epoch"), py::arg("drop_last_partial_sequence") = true,
        py::arg("add_extra_token_to_sequence") = 1);
  m.def("build_sample_idx_int64", &build_sample_idx<int64_t>,
        "[N+1, 2] int64 (document-stream position, offset) of every sample start.",
        py::arg("sizes"), py::arg("document_idx"), py::arg("seq_length"), py::arg("num_epochs"),
        py::arg("tokens_per_epoch"), py::arg("drop_last_partial_sequence") = true,
        py::arg("add_extra_token_to_sequence") = 1);
  m.def("build_blending_indices", &build_blending_indices,
        "Greedy weighted interleave of `size` samples into dataset_index / dataset_sample_index.",
        py::arg("dataset_index"), py::arg("dataset_sample_index"), py::arg("weights"),
        py::arg("num_datasets"), py::arg("size"), py::arg("verbose") = false);
  m.def("build_blending_indices_from", &build_blending_indices_from,
        "Greedy weighted interleave of one phase; sample ids continue from per-dataset cursors `counts` (updated in place).",
        py::arg("dataset_index"), py::arg("dataset_sample_index"), py::arg("weights"),
        py::arg("counts"));
}
