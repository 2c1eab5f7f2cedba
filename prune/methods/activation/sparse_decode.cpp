// Decode kernels of activation sparsity (prune/methods/activation/kernel.py builds and loads this file).
//
// y = W x reads only the weight columns W[:, j] whose input x_j survives its threshold (|x_j| > cut_j). The columns
// are passed as the rows of W^T, contiguous [in, out], so each kept column is one contiguous read. Memory, not
// arithmetic, bounds decode at batch 1: skipping half of the columns skips half of the bytes.
//
// Rows of x (tokens of one call) share one pass over the union of their kept columns: each weight row is read
// once and applied to every token that kept it (a token that did not keep it multiplies it by zero). Kept rows
// are taken eight at a time (eight independent memory streams, and one load and store of the accumulator per
// eight rows: four left the short rows of a down projection slower than a dense gemv) and the next eight are
// prefetched while the current ones are summed. Accumulation is in float32 whatever the weights' dtype (float32,
// bfloat16, float16).
// Output columns are split across torch's intra-op threads (at::parallel_for), so more threads read disjoint
// slices of the same rows.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kUnroll = 8;      // kept rows summed per pass over the output slice
constexpr int64_t kGrain = 256;     // output columns per thread at least
constexpr int64_t kCacheLine = 64;  // bytes

inline float as_float(float v) { return v; }
inline float as_float(c10::Half v) { return static_cast<float>(v); }
inline float as_float(c10::BFloat16 v) {  // the upper half of a float32: a shift the compiler vectorizes
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

template <typename T>
inline void prefetch(const T* begin, int64_t count) {
  const char* bytes = reinterpret_cast<const char*>(begin);
  for (int64_t offset = 0; offset < count * static_cast<int64_t>(sizeof(T)); offset += kCacheLine) {
    __builtin_prefetch(bytes + offset, 0, 3);
  }
}

// The kept input indices (union over the rows, padded to a multiple of kUnroll with zero values) and, per kept
// index, each row's value with the entries at or below their cut zeroed: values[q * rows + b].
struct Kept {
  std::vector<int64_t> index;
  std::vector<float> values;
  int64_t count = 0;  // before padding
};

Kept keep_above(const std::vector<float>& x, int64_t rows, int64_t width, const float* cut) {
  Kept kept;
  kept.index.reserve(width + kUnroll);
  kept.values.reserve((width + kUnroll) * rows);
  for (int64_t j = 0; j < width; ++j) {
    bool any = false;
    for (int64_t b = 0; b < rows; ++b) any |= std::fabs(x[b * width + j]) > cut[j];
    if (!any) continue;
    kept.index.push_back(j);
    for (int64_t b = 0; b < rows; ++b) {
      const float v = x[b * width + j];
      kept.values.push_back(std::fabs(v) > cut[j] ? v : 0.f);
    }
  }
  kept.count = static_cast<int64_t>(kept.index.size());
  while (kept.index.size() % kUnroll) {
    kept.index.push_back(kept.index.empty() ? 0 : kept.index.back());
    for (int64_t b = 0; b < rows; ++b) kept.values.push_back(0.f);
  }
  return kept;
}

template <typename T>
std::vector<float> to_float(const at::Tensor& t) {
  const T* data = t.data_ptr<T>();
  std::vector<float> out(t.numel());
  for (int64_t i = 0; i < t.numel(); ++i) out[i] = as_float(data[i]);
  return out;
}

// out[b, begin:end] = sum over kept q of coef[q * rows + b] * matrix[index[q], begin:end] (+ bias), for the
// output slice [begin, end) of one thread.
template <typename T>
void accumulate_rows(const Kept& kept, const std::vector<float>& coef, const T* matrix, int64_t width,
                     const T* bias, T* out, int64_t rows, int64_t begin, int64_t end) {
  const int64_t span = end - begin;
  std::vector<float> acc(rows * span, 0.f);
  const int64_t padded = static_cast<int64_t>(kept.index.size());
  for (int64_t q = 0; q < padded; q += kUnroll) {
    if (q + kUnroll < padded) {
      for (int64_t r = 0; r < kUnroll; ++r) prefetch(matrix + kept.index[q + kUnroll + r] * width + begin, span);
    }
    const T* __restrict r0 = matrix + kept.index[q] * width + begin;
    const T* __restrict r1 = matrix + kept.index[q + 1] * width + begin;
    const T* __restrict r2 = matrix + kept.index[q + 2] * width + begin;
    const T* __restrict r3 = matrix + kept.index[q + 3] * width + begin;
    const T* __restrict r4 = matrix + kept.index[q + 4] * width + begin;
    const T* __restrict r5 = matrix + kept.index[q + 5] * width + begin;
    const T* __restrict r6 = matrix + kept.index[q + 6] * width + begin;
    const T* __restrict r7 = matrix + kept.index[q + 7] * width + begin;
    for (int64_t b = 0; b < rows; ++b) {
      const float* c = coef.data() + q * rows + b;  // c[r * rows]: row b's value for kept row q + r
      bool any = false;
      for (int64_t r = 0; r < kUnroll; ++r) any |= c[r * rows] != 0.f;
      if (!any) continue;
      const float c0 = c[0], c1 = c[rows], c2 = c[2 * rows], c3 = c[3 * rows];
      const float c4 = c[4 * rows], c5 = c[5 * rows], c6 = c[6 * rows], c7 = c[7 * rows];
      float* __restrict a = acc.data() + b * span;
#pragma omp simd
      for (int64_t k = 0; k < span; ++k) {
        a[k] += (c0 * as_float(r0[k]) + c1 * as_float(r1[k]) + c2 * as_float(r2[k]) + c3 * as_float(r3[k])) +
                (c4 * as_float(r4[k]) + c5 * as_float(r5[k]) + c6 * as_float(r6[k]) + c7 * as_float(r7[k]));
      }
    }
  }
  for (int64_t b = 0; b < rows; ++b) {
    for (int64_t k = 0; k < span; ++k) {
      const float with_bias = acc[b * span + k] + (bias != nullptr ? as_float(bias[begin + k]) : 0.f);
      out[b * width + begin + k] = static_cast<T>(with_bias);
    }
  }
}

template <typename T>
void accumulate(const Kept& kept, const std::vector<float>& coef, const T* matrix, int64_t width, const T* bias,
                T* out, int64_t rows) {
  at::parallel_for(0, width, kGrain, [&](int64_t begin, int64_t end) {
    accumulate_rows(kept, coef, matrix, width, bias, out, rows, begin, end);
  });
}

template <typename T>
float dot(const T* __restrict row, const float* __restrict x, int64_t n) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < n; ++k) sum += as_float(row[k]) * x[k];
  return sum;
}

void check_pair(const at::Tensor& x, const at::Tensor& matrix, int64_t x_width, const char* what) {
  TORCH_CHECK(x.dim() == 2 && matrix.dim() == 2, what, ": expects 2-D tensors");
  TORCH_CHECK(matrix.is_contiguous(), what, ": the weight rows must be contiguous");
  TORCH_CHECK(x.scalar_type() == matrix.scalar_type(), what, ": input and weights must share a dtype");
  TORCH_CHECK(x.device().is_cpu() && matrix.device().is_cpu(), what, ": CPU tensors only");
  TORCH_CHECK(matrix.size(0) == x_width, what, ": weight rows ", matrix.size(0), " != input width ", x_width);
}

void check_cut(const at::Tensor& cut, int64_t width, const char* what) {
  TORCH_CHECK(cut.dim() == 1 && cut.size(0) == width && cut.is_contiguous(), what, ": cut must be [", width, "] contiguous");
  TORCH_CHECK(cut.scalar_type() == at::kFloat && cut.device().is_cpu(), what, ": cut must be a float32 CPU tensor");
}

template <typename T>
const T* bias_data(const std::optional<at::Tensor>& bias, int64_t size, at::Tensor& holder) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->numel() == size, "bias of ", bias->numel(), " values, expected ", size);
  holder = bias->contiguous();
  return holder.data_ptr<T>();
}

// y [rows, out] = (x where |x| > cut, else 0) @ columns, with columns = W^T [in, out] contiguous, cut [in] float32.
at::Tensor threshold_linear(const at::Tensor& x, const at::Tensor& columns, const at::Tensor& cut,
                            const std::optional<at::Tensor>& bias) {
  check_pair(x, columns, x.size(1), "threshold_linear");
  check_cut(cut, x.size(1), "threshold_linear");
  const int64_t rows = x.size(0), width = columns.size(1);
  auto y = at::empty({rows, width}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "threshold_linear", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "threshold_linear: float64 is not supported");
    } else {
      const auto xs = to_float<scalar_t>(x.contiguous());
      const Kept kept = keep_above(xs, rows, x.size(1), cut.data_ptr<float>());
      at::Tensor holder;
      accumulate<scalar_t>(kept, kept.values, columns.data_ptr<scalar_t>(), width,
                           bias_data<scalar_t>(bias, width, holder), y.data_ptr<scalar_t>(), rows);
    }
  });
  return y;
}

// A gated FFN down((act * up(x)) with act = act_fn(gate(x)) given, computing up and down only for the neurons
// whose |act| > cut (CATS): up is [inter, hidden] (W_up as stored), down_columns [inter, hidden] (W_down^T), cut
// [inter] float32.
at::Tensor threshold_ffn(const at::Tensor& x, const at::Tensor& act, const at::Tensor& cut, const at::Tensor& up,
                         const std::optional<at::Tensor>& up_bias, const at::Tensor& down_columns,
                         const std::optional<at::Tensor>& down_bias) {
  check_pair(act, down_columns, act.size(1), "threshold_ffn (down)");
  check_pair(act, up, act.size(1), "threshold_ffn (up)");
  check_cut(cut, act.size(1), "threshold_ffn");
  TORCH_CHECK(x.dim() == 2 && x.size(0) == act.size(0) && x.size(1) == up.size(1), "threshold_ffn: x shape");
  TORCH_CHECK(x.scalar_type() == up.scalar_type(), "threshold_ffn: x and weights must share a dtype");
  const int64_t rows = x.size(0), hidden = x.size(1);
  auto y = at::empty({rows, hidden}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "threshold_ffn", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "threshold_ffn: float64 is not supported");
    } else {
      const auto xs = to_float<scalar_t>(x.contiguous());
      const auto as = to_float<scalar_t>(act.contiguous());
      const Kept kept = keep_above(as, rows, act.size(1), cut.data_ptr<float>());
      at::Tensor up_holder, down_holder;
      const scalar_t* ub = bias_data<scalar_t>(up_bias, up.size(0), up_holder);
      const scalar_t* w = up.data_ptr<scalar_t>();
      // h = act * up(x) for the kept neurons (zero where a row did not keep the neuron)
      std::vector<float> h(kept.values.size(), 0.f);
      at::parallel_for(0, kept.count, 16, [&](int64_t begin, int64_t end) {
        for (int64_t q = begin; q < end; ++q) {
          if (q + 1 < end) prefetch(w + kept.index[q + 1] * hidden, hidden);
          const scalar_t* row = w + kept.index[q] * hidden;
          for (int64_t b = 0; b < rows; ++b) {
            const float a = kept.values[q * rows + b];
            if (a == 0.f) continue;
            const float u = dot(row, xs.data() + b * hidden, hidden) + (ub != nullptr ? as_float(ub[kept.index[q]]) : 0.f);
            h[q * rows + b] = a * u;
          }
        }
      });
      accumulate<scalar_t>(kept, h, down_columns.data_ptr<scalar_t>(), hidden,
                           bias_data<scalar_t>(down_bias, hidden, down_holder), y.data_ptr<scalar_t>(), rows);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(maskprune_sparse_decode, m) {
  m.def("threshold_linear(Tensor x, Tensor columns, Tensor cut, Tensor? bias) -> Tensor");
  m.def(
      "threshold_ffn(Tensor x, Tensor act, Tensor cut, Tensor up, Tensor? up_bias, Tensor down_columns, "
      "Tensor? down_bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(maskprune_sparse_decode, CPU, m) {
  m.impl("threshold_linear", &threshold_linear);
  m.impl("threshold_ffn", &threshold_ffn);
}
