// sampling.h — one token per row of logits, for a whole batch in one call (the engine's sampler).
//
// The semantics are those of server/tinyserve/engine/sampling.py, the reference this is tested
// against (same token for the same logits and the same uniform draw u):
//   temperature 0: argmax, ties -> lowest id (a NaN wins, as numpy's argmax has it);
//   else, in float64: top-k (the k largest, ties -> lowest id, kept in id order) -> softmax of
//   x / T -> top-p (sorted by descending probability, ties -> lowest id; the shortest prefix whose
//   mass reaches p, renormalised) -> min-p (keep p >= min_p * max p, renormalised) -> inverse CDF
//   at u: the first candidate whose running sum exceeds u * total.
// Penalties, grammar masks and logprobs are applied by the caller to / read from the logits.
// Results can differ from the reference only where u falls within rounding (~1e-15) of a
// boundary between two tokens' cumulative probabilities.
#pragma once
#include <cstdint>

namespace ts {

struct SampleParams {
    double temperature;  // 0 = greedy
    int32_t top_k;       // 0 (or >= vocab) = off
    double top_p;        // 1 = off; in (0, 1]
    double min_p;        // 0 = off; in [0, 1)
    double u;            // the uniform draw in [0, 1) (unused when greedy)
};

// One token from logits[0..vocab). Always in [0, vocab).
int32_t sample_row(const float* logits, int vocab, const SampleParams& p);

// out[r] = sample_row(logits + r * vocab, vocab, params[r]) for every row, rows spread over the
// compute pool when the batch is large enough to pay for it.
void sample_rows(const float* logits, int rows, int vocab, const SampleParams* params, int32_t* out);

}  // namespace ts
