// Owner of the `medfast` operator namespace; each op family adds its schemas with
// TORCH_LIBRARY_FRAGMENT in its own folder.
#include <torch/library.h>

TORCH_LIBRARY(medfast, m) {}
