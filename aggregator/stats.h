/*
 * stats.h - the statistics of the experiment marts (CONTRACT §5, §6).
 *
 * Distribution functions come from Debian's r-mathlib (libRmath, the
 * standalone build of R's nmath), reached only through the stx_p* and stx_q*
 * wrappers below so that Rmath.h, whose macros rename common identifiers such
 * as pt and qt, stays inside stats.c.
 *
 * Every statistic is an stx_val_t: ok == 0 is SQL NULL. A statistic that the
 * contract calls undefined (a zero variance, an empty variant, p_c = 0 for a
 * relative lift) comes back with ok == 0 and v == 0, so no NaN or infinity
 * ever reaches the sink. The functions never abort and never allocate.
 *
 * The experiment statistics are computed from per-variant sufficient
 * statistics (stx_suff_t), which the aggregator keeps incrementally, so a
 * flush never rescans users. Only the logistic regression needs rows; its
 * grouped form takes one row per distinct design row with trial and success
 * counts, which the aggregator can also keep incrementally.
 *
 * docs/experiments.md gives every formula with its source.
 */
#ifndef CLICKMART_AGGREGATOR_STATS_H
#define CLICKMART_AGGREGATOR_STATS_H

#include <stddef.h>
#include <stdint.h>

#define STX_EINVAL (-200)      /* an argument is out of its domain */
#define STX_EFEW (-201)        /* fewer than 2 outcomes of either kind */
#define STX_ENOCONV (-202)     /* no convergence within max_iter iterations */
#define STX_ESINGULAR (-203)   /* the information matrix is not positive definite */
#define STX_ESEPARATION (-204) /* the likelihood has no maximum: coefficients diverge */
#define STX_ETOOBIG (-205)     /* more than STX_LOGIT_MAX_P columns */

/* The default significance level and sequential tuning N* of CONTRACT §6. */
#define STX_DEFAULT_ALPHA 0.05
#define STX_DEFAULT_N_STAR 5000.0
/* srm_detected when srm_p is below this (CONTRACT §6). */
#define STX_SRM_THRESHOLD 0.001

/* ---------------------------------------------------------------------- */
/* Distribution functions (thin wrappers over libRmath).                    */
/*                                                                          */
/* They return what R returns, including 0, 1 and ±infinity at the ends    */
/* (qnorm(0) is -inf), and NaN for an argument outside the domain (a df     */
/* <= 0, a probability outside [0, 1], a NaN). Only these five functions    */
/* can return a non-finite value; everything else in this header converts   */
/* such a value to NULL.                                                    */
/* ---------------------------------------------------------------------- */

/* Standard normal CDF Φ(x). For a small upper tail use stx_pnorm(-x): the
 * lower tail is computed directly, so stx_pnorm(-37) is 5.7e-300, not 0. */
double stx_pnorm(double x);
/* Standard normal quantile Φ⁻¹(p). */
double stx_qnorm(double p);
/* Student t CDF with df > 0 degrees of freedom (df need not be an integer). */
double stx_pt(double x, double df);
/* Student t quantile. */
double stx_qt(double p, double df);
/* Chi-square CDF, or its upper tail P(X > x) when upper_tail != 0; the upper
 * tail is computed directly, so it stays accurate down to ~1e-308. */
double stx_pchisq(double x, double df, int upper_tail);

/* ---------------------------------------------------------------------- */
/* Values that may be NULL.                                                 */
/* ---------------------------------------------------------------------- */

/* ok == 0 means SQL NULL (v is then 0); ok == 1 means v is finite. */
typedef struct stx_val {
    double v;
    int ok;
} stx_val_t;

/* ---------------------------------------------------------------------- */
/* Per-variant sufficient statistics.                                       */
/* ---------------------------------------------------------------------- */

/*
 * The sums over one variant's exposed, not excluded users (the rows of
 * user_outcomes with that variant). Every field is a plain sum of per-user
 * contributions, so a user's row is added when it appears and retracted and
 * re-added when it changes (stx_suff_apply does both).
 *
 *   users           number of users
 *   converters      users with converted = true
 *   orders          sum of orders
 *   revenue_cents   sum of per-user window revenue, integer cents
 *   revenue_sq      sum of squared per-user window revenue in currency units
 *                   (not cents): Σ (revenue_cents_i / 100)²
 *   events          sum of per-user window events
 *   carts           users with added_to_cart = true (users, not events)
 *   checkouts       users with reached_checkout = true (users, not events)
 *   revenue_sq_lo,  optional exact form of revenue_sq: Σ revenue_cents_i² as
 *   revenue_sq_hi   an unsigned 128-bit integer (low and high 64-bit words).
 *
 * revenue_sq as a double drifts when users are retracted and re-added, and
 * the drift depends on the order of the updates, so two runs over the same
 * events could write revenue_sd values that differ in the last digits, and a
 * variance that is exactly zero could come out as a tiny positive number. The
 * exact words avoid both: when they are not both zero, the statistics derive
 * the variance from them and from revenue_cents in exact integer arithmetic
 * and ignore revenue_sq. stx_suff_apply maintains both forms; a caller that
 * fills the struct itself may leave the exact words at zero.
 */
typedef struct stx_suff {
    int64_t users, converters, orders;
    int64_t revenue_cents;
    double revenue_sq;
    int64_t events, carts, checkouts;
    uint64_t revenue_sq_lo, revenue_sq_hi;
} stx_suff_t;

/* One user_outcomes row, as far as the statistics need it. */
typedef struct stx_user {
    int converted;
    int64_t orders;
    int64_t revenue_cents; /* >= 0 */
    int64_t events;
    int added_to_cart;
    int reached_checkout;
} stx_user_t;

/*
 * Add (sign = +1) or retract (sign = -1) one user's contribution. Returns 0,
 * or STX_EINVAL (s unchanged) for a negative field, a sign other than ±1, or
 * a retraction that would make a sum negative. revenue_sq is recomputed from
 * the exact words each time, so it is a function of the set of users only.
 */
int stx_suff_apply(stx_suff_t *s, const stx_user_t *u, int sign);

/* The per-variant columns of experiment_results (CONTRACT §5). */
typedef struct stx_variant {
    stx_val_t conversion_rate;  /* converters / users */
    stx_val_t revenue_per_user; /* revenue / users, currency units */
    stx_val_t revenue_sd;       /* sample SD (n - 1) of per-user revenue; NULL for n < 2 */
    stx_val_t events_per_user;  /* events / users */
    stx_val_t cart_rate;        /* carts / users */
    stx_val_t checkout_rate;    /* checkouts / users */
} stx_variant_t;

/*
 * Fill *out from *s. Every rate is NULL when users == 0. Returns 0, or
 * STX_EINVAL (everything NULL) when *s is inconsistent: a negative sum,
 * converters, carts or checkouts above users, or a revenue_sq that is not a
 * finite non-negative number.
 */
int stx_variant_summary(const stx_suff_t *s, stx_variant_t *out);

/* The comparison columns of a non-control row (CONTRACT §6). */
typedef struct stx_compare {
    stx_val_t abs_lift, rel_lift;
    stx_val_t diff_ci_low, diff_ci_high;            /* unpooled Wald */
    stx_val_t rel_ci_low, rel_ci_high;              /* delta method */
    stx_val_t z, p_value;                           /* pooled two-proportion z-test */
    stx_val_t seq_ci_low, seq_ci_high, seq_p_value; /* normal-mixture confidence sequence */
    stx_val_t chance_to_win;
    stx_val_t rpu_diff, rpu_ci_low, rpu_ci_high, rpu_p_value; /* Welch */
    /* Not columns of experiment_results; kept for tests and diagnostics. */
    stx_val_t rpu_t, rpu_df;
} stx_compare_t;

/*
 * Compare treatment *t with control *c at level 1 - alpha with sequential
 * tuning n_star (N* of §6). Returns 0, or STX_EINVAL (everything NULL) for
 * alpha outside (0, 1), n_star not finite and positive, or inconsistent
 * sufficient statistics. Undefined statistics are NULL:
 *   - everything when either variant has no users;
 *   - rel_lift, rel_ci when p_c = 0; rel_ci also when its variance is 0;
 *   - z, p_value when the pooled rate is 0 or 1;
 *   - diff_ci, seq_ci, seq_p_value, chance_to_win when both rates are 0 or 1
 *     (the unpooled variance is 0);
 *   - rpu_ci, rpu_p_value, rpu_t, rpu_df when a variant has fewer than 2
 *     users or both revenue variances are 0 (rpu_diff needs one user each).
 * seq_p_value < alpha holds exactly when seq_ci_low > 0 or seq_ci_high < 0.
 */
int stx_compare(const stx_suff_t *t, const stx_suff_t *c, double alpha, double n_star,
                stx_compare_t *out);

/* ---------------------------------------------------------------------- */
/* Experiment-level tests.                                                  */
/* ---------------------------------------------------------------------- */

/*
 * Pearson's chi-square test of independence on the k x 2 table of
 * (converted[i], not_converted[i]), with Yates' continuity correction when
 * k == 2 (one degree of freedom) as scipy.stats.chi2_contingency applies it:
 * each |O - E| is reduced by min(0.5, |O - E|). Returns 0; chi2 and p are
 * NULL when k < 2 or an expected count is 0 (a row or a column of zeros).
 * Returns STX_EINVAL (both NULL) for a negative count or a NULL pointer.
 */
int stx_chi2_independence(const int64_t *converted, const int64_t *not_converted, int k,
                          stx_val_t *chi2, stx_val_t *p);

/*
 * Sample ratio mismatch: chi-square goodness of fit of users[0..k) against
 * the expected split weights[0..k) (normalised to sum 1; weights == NULL
 * means an equal split), k - 1 degrees of freedom, no continuity correction.
 * *detected is 1 when p < STX_SRM_THRESHOLD, else 0 (also when p is NULL).
 * Returns 0; chi2 and p are NULL when k < 2 or there are no users. Returns
 * STX_EINVAL (NULL, not detected) for a negative count or a weight that is
 * not finite and positive.
 */
int stx_srm(const int64_t *users, const double *weights, int k, stx_val_t *chi2, stx_val_t *p,
            int *detected);

/* ---------------------------------------------------------------------- */
/* Logistic regression (CONTRACT §5, experiment_regression).                */
/* ---------------------------------------------------------------------- */

#define STX_LOGIT_MAX_P 32
#define STX_LOGIT_MAX_ITER 50

typedef struct stx_logit {
    int p;                           /* number of coefficients */
    int64_t n;                       /* observations (sum of trials) */
    int iterations;                  /* Newton steps taken */
    int converged;                   /* 1 on success */
    double deviance;                 /* -2 log-likelihood at the optimum */
    double coef[STX_LOGIT_MAX_P];    /* maximum likelihood estimates */
    double std_err[STX_LOGIT_MAX_P]; /* sqrt of the diagonal of the inverse information */
    double z[STX_LOGIT_MAX_P];       /* coef / std_err */
    double p_value[STX_LOGIT_MAX_P]; /* two-sided normal: 2 Φ(-|z|) */
} stx_logit_t;

/*
 * Fit P(y = 1) = 1 / (1 + exp(-X β)) by maximum likelihood with Newton's
 * method (IRLS), starting from β = 0. X is n x p, row-major, and includes the
 * intercept column; y holds 0 or 1. max_iter <= 0 means STX_LOGIT_MAX_ITER.
 *
 * Converged when the largest |Δβ_j| of a Newton step is below 1e-10, or
 * when the deviance changes by less than 1e-12 × (|deviance| + 0.1) over a
 * step whose largest |Δβ_j| is below 1e-3. The second condition ends a fit
 * whose coefficients cannot get below 1e-10 in floating point. Its guard on
 * the step is there for separation, where the deviance settles while a
 * coefficient keeps moving by about 1 per step towards infinity: three
 * consecutive steps with a settled deviance and a step of 1e-3 or more are
 * reported as STX_ESEPARATION.
 *
 * Returns 0 with every array entry finite, or a negative code and
 * out->converged = 0: STX_EFEW (fewer than 2 successes or 2 failures),
 * STX_ENOCONV, STX_ESINGULAR (collinear columns), STX_ESEPARATION,
 * STX_ETOOBIG, STX_EINVAL (n == 0, p < 1, a non-finite X, a y not 0 or 1).
 */
int stx_logit(const double *X, const double *y, size_t n, int p, int max_iter, stx_logit_t *out);

/*
 * The same fit on grouped data: row i of X stands for trials[i] observations,
 * successes[i] of them with y = 1. Gives the same estimates, standard errors
 * and deviance as stx_logit on the expanded rows, at the cost of the number
 * of distinct rows: for the design of §5 (variant, ln(1 + events)) that is
 * the number of distinct (variant, events) pairs, which the aggregator can
 * keep as counters instead of scanning users.
 */
int stx_logit_grouped(const double *X, const int64_t *successes, const int64_t *trials, size_t n,
                      int p, int max_iter, stx_logit_t *out);

const char *stx_strerror(int err);

#endif
