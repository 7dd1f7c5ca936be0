// Python module medfast._C: build information only. Loading it registers the operators
// (TORCH_LIBRARY blocks in the op folders) with the PyTorch dispatcher.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "common/cpu_simd.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "medfast compiled operators (registered as torch.ops.medfast.*)";
  m.def("build_info", [] {
    py::dict d;
    d["torch"] = std::string(MEDFAST_TORCH_VERSION);
#ifdef MEDFAST_WITH_CUDA
    d["cuda"] = true;
    d["cuda_version"] = std::string(MEDFAST_CUDA_VERSION);
    d["cuda_archs"] = std::string(MEDFAST_CUDA_ARCHS);
#else
    d["cuda"] = false;
    d["cuda_version"] = py::none();
    d["cuda_archs"] = std::string();
#endif
#ifdef MEDFAST_OPENMP
    d["openmp"] = true;
#else
    d["openmp"] = false;
#endif
    d["compiler"] = std::string(__VERSION__);
    d["cpu_simd"] = medfast::cpu_simd_available() ? "avx2" : "none";
    return d;
  });
  // Testing switch: compare the AVX2 CPU fast paths with the generic launcher.
  m.def("_set_cpu_simd", &medfast::set_cpu_simd, py::arg("enabled"));
}
