// medquant::gemv4_bound_native: a bound native matmul called by its handle, in C++.
//
// The same product as the operator medquant::gemv4_bound (its Python kernel in medquant/kernels/native.py):
// y (M, n) float32 = the bound matmul of x (M, k), float32 or bfloat16 with unit column stride, by the C function
// mq_call of medquant's native library, flags = xmode << 2 (| 1 for bfloat16 x). A graph compiled ahead of time
// (AOTInductor) reaches the Python kernel through its proxy executor and the interpreter at every call, about
// 5 us each, 211 calls per SmolLM2 token; this kernel is reached without Python.
//
// medquant::gemv4_bound_by_native is the same call with the handle in a one-element int64 tensor: a program
// compiled ahead of time is handed the tensors of the process that loads it, so it is not tied to the handles of
// the process that compiled it.
//
// Handles are bound here by medquant.kernels.native_op (native_bind: the mq_call address and the bound
// weight's argument array, which the Python object NativeGemv4 owns) and unbound when that object is freed
// (native_unbind). Anything this kernel does not handle itself -- an unknown handle, another shape, dtype or
// layout, a call mq_call declines (e.g. x with a value that is not finite in the blocked form) -- goes to the
// Python operator medquant::gemv4_bound, which raises the same errors or runs the same fallback as before.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <mutex>
#include <shared_mutex>
#include <string>
#include <unordered_map>

#ifndef MQ_OP_KEY
#define MQ_OP_KEY "unset"
#endif

namespace {

using mq_call_t = int (*)(const int64_t*, const void*, int64_t, int64_t, void*, int64_t, int, int);

struct Bound {
  mq_call_t call;
  const int64_t* head;
  int64_t n;
  int64_t k;
};

std::shared_mutex table_mutex;
std::unordered_map<int64_t, Bound> table;

at::Tensor python_kernel(const at::Tensor& x, int64_t handle, int64_t n, int64_t xmode) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("medquant::gemv4_bound", "")
                       .typed<at::Tensor(const at::Tensor&, int64_t, int64_t, int64_t)>();
  return op.call(x, handle, n, xmode);
}

at::Tensor gemv4_bound_native(const at::Tensor& x, int64_t handle, int64_t n, int64_t xmode) {
  Bound b{};
  bool found = false;
  {
    std::shared_lock<std::shared_mutex> lock(table_mutex);
    auto it = table.find(handle);
    if (it != table.end()) {
      b = it->second;
      found = true;
    }
  }
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const bool takes = found && b.n == n && x.dim() == 2 && x.size(1) == b.k && x.device().is_cpu() &&
                     (bf16 || x.scalar_type() == at::kFloat) && (b.k <= 1 || x.stride(1) == 1) &&
                     ((xmode >= 0 && xmode <= 4) || xmode == 8);
  if (!takes) {
    return python_kernel(x, handle, n, xmode);
  }
  at::Tensor y = at::empty({x.size(0), n}, x.options().dtype(at::kFloat));
  const int flags = static_cast<int>(xmode << 2) | (bf16 ? 1 : 0);
  const int rc = b.call(b.head, x.data_ptr(), x.size(0), x.stride(0), y.data_ptr(), y.stride(0), flags,
                        at::get_num_threads());
  if (rc != 0) {
    return python_kernel(x, handle, n, xmode);
  }
  return y;
}

at::Tensor python_by_kernel(const at::Tensor& x, const at::Tensor& handle, int64_t n, int64_t xmode) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("medquant::gemv4_bound_by", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t)>();
  return op.call(x, handle, n, xmode);
}

// The handle read from a one-element int64 CPU tensor (what a program compiled ahead of time is handed at load,
// medquant.quant.aot); anything else goes to the Python operator medquant::gemv4_bound_by, which raises.
at::Tensor gemv4_bound_by_native(const at::Tensor& x, const at::Tensor& handle, int64_t n, int64_t xmode) {
  if (!handle.device().is_cpu() || handle.scalar_type() != at::kLong || handle.numel() != 1) {
    return python_by_kernel(x, handle, n, xmode);
  }
  return gemv4_bound_native(x, *handle.const_data_ptr<int64_t>(), n, xmode);
}

void native_bind(int64_t handle, int64_t call, int64_t head, int64_t n, int64_t k) {
  TORCH_CHECK(call != 0 && head != 0 && n > 0 && k >= 0, "medquant::native_bind: bad arguments for handle ",
              handle);
  std::unique_lock<std::shared_mutex> lock(table_mutex);
  table[handle] = Bound{reinterpret_cast<mq_call_t>(call), reinterpret_cast<const int64_t*>(head), n, k};
}

void native_unbind(int64_t handle) {
  std::unique_lock<std::shared_mutex> lock(table_mutex);
  table.erase(handle);
}

int64_t native_bound_count() {
  std::shared_lock<std::shared_mutex> lock(table_mutex);
  return static_cast<int64_t>(table.size());
}

std::string native_op_key() { return MQ_OP_KEY; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(medquant, m) {
  m.def("gemv4_bound_native(Tensor x, int handle, int n, int xmode) -> Tensor");
  m.def("gemv4_bound_by_native(Tensor x, Tensor handle, int n, int xmode) -> Tensor");
  m.def("native_bind(int handle, int call, int head, int n, int k) -> ()", &native_bind);
  m.def("native_unbind(int handle) -> ()", &native_unbind);
  m.def("native_bound_count() -> int", &native_bound_count);
  m.def("native_op_key() -> str", &native_op_key);
}

TORCH_LIBRARY_IMPL(medquant, CPU, m) {
  m.impl("gemv4_bound_native", &gemv4_bound_native);
  m.impl("gemv4_bound_by_native", &gemv4_bound_by_native);
}
