// Log helpers shared by the C++ drop-in harnesses (fit.cpp, mtp.cpp): llama.cpp logs a line in
// pieces, and the harnesses keep only the lines that are the memory's (not the loader's paths
// and timings, which differ between runs).
#pragma once

#include <initializer_list>
#include <string>

// Accumulates log text; true, with the whole line (its '\n' included) in `line`, when `text`
// ends one.
inline bool whole_log_line(const char * text, std::string & line) {
    static thread_local std::string pending;
    pending += text;
    if (pending.empty() || pending.back() != '\n') {
        return false;
    }
    line.swap(pending);
    pending.clear();
    return true;
}

// Whether `line` contains one of `keys`.
inline bool mentions_any(const std::string & line, std::initializer_list<const char *> keys) {
    for (const char * k : keys) {
        if (line.find(k) != std::string::npos) {
            return true;
        }
    }
    return false;
}
