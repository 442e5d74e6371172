# Build settings for llama-cpp-python that CMAKE_ARGS alone cannot express. helpers/machine/install.py makes CMake
# run this file right after llama.cpp's own project() call (CMAKE_PROJECT_llama.cpp_INCLUDE).

# llama-cpp-python loads only libllama and ggml. llama.cpp's "common" utilities are built but never shipped
# in its wheel: skip them (llama-cpp-python's own Emscripten build does the same).
set(LLAMA_BUILD_COMMON OFF CACHE BOOL "llama: build common utils library" FORCE)

# -march=native turns on AMX on CPUs that advertise it, and ggml then runs AMX tile instructions. Virtual
# machines that advertise AMX without enabling its register state kill the process with SIGILL (seen on
# this project's build machine). AMX only speeds up batched prompt processing on recent Xeons: leave it out.
if(CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64)$" AND NOT MSVC)
    include(CheckCCompilerFlag)
    check_c_compiler_flag("-mno-amx-tile" HAVE_MNO_AMX)
    if(HAVE_MNO_AMX)
        string(APPEND CMAKE_C_FLAGS " -mno-amx-tile -mno-amx-int8 -mno-amx-bf16")
        string(APPEND CMAKE_CXX_FLAGS " -mno-amx-tile -mno-amx-int8 -mno-amx-bf16")
    endif()
endif()
