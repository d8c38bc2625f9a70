/* Headers of ggml that ggml-sys binds (see bindgen.flags for what is kept). */
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "gguf.h"
