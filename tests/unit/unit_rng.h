/*
 * unit_rng.h - the unit tests' random numbers: Marsaglia's xorshift64, so that a
 * failing case is the same on every machine and every run. Each test keeps its own
 * state (and seed), so adding draws to one test does not change another's inputs.
 */
#ifndef CLICKMART_UNIT_RNG_H
#define CLICKMART_UNIT_RNG_H

#include <stdint.h>

/* The next number of the sequence in *state (which must not be 0). */
static inline uint64_t ut_xorshift(uint64_t *state)
{
    uint64_t x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *state = x;
}

#endif
