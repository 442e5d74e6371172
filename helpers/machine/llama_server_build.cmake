# Build settings for llama-server (helpers/machine/server_build.py): the same as the bindings' build
# (llama_cpp_build.cmake, included below: no AMX), except that the server needs llama.cpp's "common"
# utilities, which the bindings skip. CMake runs this file right after llama.cpp's own project() call.
include(${CMAKE_CURRENT_LIST_DIR}/llama_cpp_build.cmake)
set(LLAMA_BUILD_COMMON ON CACHE BOOL "llama: build common utils library" FORCE)
