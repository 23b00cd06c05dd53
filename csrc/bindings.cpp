// Registers the row ops as torch operators (torch.ops.unlearn_ext.*) and their CPU kernels.
// The CUDA extension (csrc/cuda) registers CUDA kernels for the same schemas; fake (meta)
// implementations live in Python (unlearn_ext/_fake_ops.py) so torch.compile can trace.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/grad_pool.h"
#include "cpu/row_kernels.h"
#include "torch_row_args.h"

namespace unlearn_ext {
namespace {

// Labels outside [0, V) other than ignore_index are refused: free to check on the CPU.
void check_label_range(const RowArgs& a) {
  if (a.labels == nullptr) return;
  for (int64_t r = 0; r < a.rows; ++r) {
    const int64_t y = a.labels[r];
    TORCH_CHECK_VALUE(y == a.ignore_index || (y >= 0 && y < a.vocab), "unlearn_ext: label ", y, " at row ", r, " is outside [0, ", a.vocab, ") and is not ignore_index (", a.ignore_index, ")");
  }
}

// Rows per task: enough elements per task to amortise the scheduling.
int64_t grain(const RowArgs& a) {
  const int64_t g = (int64_t{1} << 15) / (a.vocab > 0 ? a.vocab : 1);
  return g > 0 ? g : 1;
}

void run_rows(const RowArgs& a, cpu::RowRangeFn fn) {
  if (a.rows == 0) return;
  at::parallel_for(0, a.rows, grain(a), [&](int64_t begin, int64_t end) { fn(a, begin, end); });
}

// The CPU backend of RowOps (torch_row_args.h).
struct Cpu {
  struct Guard {
    explicit Guard(const at::Tensor& logits) {
      TORCH_CHECK_VALUE(logits.device().is_cpu(), "unlearn_ext: CPU kernel called with logits on ", logits.device());
    }
  };
  static void forward(const RowArgs& a) {
    check_label_range(a);
    run_rows(a, cpu::kernels().forward);
  }
  static void backward(const RowArgs& a) {
    check_label_range(a);
    run_rows(a, cpu::kernels().backward);
  }
  static void set_grad_scale(RowArgs& a, const at::Tensor& scale) { a.grad_scale = scale.item<double>(); }
};

// grad *= scale, unless scale is 1 (on the CPU reading it costs nothing).
void scale_grad(at::Tensor grad, const at::Tensor& scale) {
  TORCH_CHECK_VALUE(scale.numel() == 1 && scale.device() == grad.device(), "unlearn_ext: scale must be one element on the device of grad");
  const double s = scale.item<double>();
  if (s != 1.0) grad.mul_(s);
}

}  // namespace

TORCH_LIBRARY(unlearn_ext, m) {
  m.def("row_loss_forward(str op, Tensor logits, Tensor? teacher, Tensor? teacher2, Tensor? labels, int ignore_index, float[] params) -> (Tensor, Tensor)");
  m.def("row_loss_forward_with_grad(str op, Tensor logits, Tensor? teacher, Tensor? teacher2, Tensor? labels, int ignore_index, float[] params, Tensor(a!) grad, Tensor grad_scale) -> (Tensor, Tensor)");
  m.def("row_loss_backward(str op, Tensor logits, Tensor? teacher, Tensor? teacher2, Tensor? labels, Tensor stats, Tensor grad_rows, int ignore_index, float[] params, Tensor(a!) grad) -> ()");
  // The fused path's backward: grad *= scale (the upstream gradient), a no-op when it is 1,
  // decided on the device.
  m.def("scale_grad(Tensor(a!) grad, Tensor scale) -> ()");
}

TORCH_LIBRARY_IMPL(unlearn_ext, CPU, m) {
  m.impl("row_loss_forward", &RowOps<Cpu>::forward);
  m.impl("row_loss_forward_with_grad", &RowOps<Cpu>::forward_with_grad);
  m.impl("row_loss_backward", &RowOps<Cpu>::backward);
  m.impl("scale_grad", &scale_grad);
}

}  // namespace unlearn_ext

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "unlearn_ext CPU kernels (the ops are registered under torch.ops.unlearn_ext)";
  m.def("cpu_isa", [] { return std::string(unlearn_ext::cpu::kernels().isa); },
        "The instruction set of the CPU kernels in use (avx512, avx2 or base).");
  m.def("grad_buffer", [](const std::vector<int64_t>& sizes, at::ScalarType dtype) {
    return unlearn_ext::cpu::grad_buffer(sizes, dtype);
  }, "An uninitialised CPU gradient buffer, reusing freed ones (csrc/cpu/grad_pool.h).");
  m.def("grad_pool_stats", [] {
    const auto s = unlearn_ext::cpu::grad_pool_stats();
    return std::make_pair(s.free_blocks, s.free_bytes);
  }, "(free blocks, free bytes) of the CPU gradient buffers' free list.");
  m.def("release_grad_pool", &unlearn_ext::cpu::release_grad_pool, "Unmaps the free gradient buffers.");
  // How many threads at::parallel_for, as the kernels call it, runs `rows` rows on (a build
  // without OpenMP runs every row on the calling thread).
  m.def("row_threads", [](int64_t rows) {
    std::vector<char> used(static_cast<size_t>(at::get_num_threads()), 0);
    at::parallel_for(0, rows, 1, [&](int64_t, int64_t) { used[static_cast<size_t>(at::get_thread_num())] = 1; });
    int64_t n = 0;
    for (const char u : used) n += u;
    return n;
  });
}
