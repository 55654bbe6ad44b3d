# Beta mixed-effects regression of semantic dissimilarity (glmmTMB, logit link).
#
# Usage: Rscript fit_beta_glmm.R job.json
#
# job.json (written by canopy.stats):
#   jobs: list of {panel: TSV path, out_dir: directory}; every panel is fitted in this one R
#         process (the coverage study fits many panels without paying R's start-up each time)
#   formula, dispersion: model formulas (the dispersion one is one-sided)
#   reference_variant, reference_task: first factor levels
#   slope_term: the covariate whose slope is compared between variants ("R_sc")
#   confidence, bootstrap, seed, gradient_tolerance, save_model
#   keep_going: a failed fit writes its message to out_dir/error.txt instead of stopping R
#
# Per job it writes into out_dir: coefficients.tsv, slopes.tsv, variance_components.tsv,
# convergence.json and (if save_model) model.rds. The Python caller moves them into place.

suppressPackageStartupMessages({
  library(jsonlite)
  library(splines)
  library(glmmTMB)
})

write_tsv <- function(frame, path) {
  write.table(frame, path, sep = "\t", quote = FALSE, row.names = FALSE, na = "NaN")
}

read_panel <- function(path) {
  ids <- c(family = "character", variant = "character", task = "character",
           prompt_id = "character", prompt_uid = "character")
  panel <- read.delim(path, sep = "\t", quote = "", colClasses = ids,
                      na.strings = c("NaN", "NA", ""), check.names = FALSE)
  other <- setdiff(unique(panel$variant), job$reference_variant)
  panel$variant <- factor(panel$variant, levels = c(job$reference_variant, sort(other)))
  tasks <- setdiff(unique(panel$task), job$reference_task)
  panel$task <- factor(panel$task, levels = c(job$reference_task, sort(tasks)))
  panel$family <- factor(panel$family, levels = sort(unique(panel$family)))
  panel$prompt_uid <- factor(panel$prompt_uid)
  panel
}

# Name of the slope-by-variant interaction term among the fixed effects (either order).
interaction_name <- function(names, slope, variant_dummy) {
  hits <- names[vapply(strsplit(names, ":", fixed = TRUE),
                       function(parts) setequal(parts, c(slope, variant_dummy)), logical(1))]
  if (length(hits) != 1) {
    stop(sprintf("the formula must contain %s and its interaction with variant; terms are: %s",
                 slope, paste(names, collapse = ", ")))
  }
  hits
}

coefficient_table <- function(fit, level) {
  z_crit <- qnorm(1 - (1 - level) / 2)
  parts <- summary(fit)$coefficients
  frames <- list()
  for (component in c("cond", "disp")) {
    m <- parts[[component]]
    if (is.null(m)) next
    frames[[component]] <- data.frame(
      component = component, term = rownames(m), estimate = m[, 1], se = m[, 2],
      z = m[, 3], p = m[, 4], ci_low = m[, 1] - z_crit * m[, 2],
      ci_high = m[, 1] + z_crit * m[, 2], stringsAsFactors = FALSE)
  }
  do.call(rbind, frames)
}

# Parametric bootstrap of the slope ratio (b1 + b3) / b1: draws of (b1, b3) from their estimated
# sampling distribution N(beta_hat, V), percentile interval (no refits; the ratio's skew is kept).
# Returns (sd, lower, upper). A fit without a positive-definite Hessian can report a negative or
# NaN variance; there is then no distribution to draw from, the interval is NaN, and the fit is
# already reported as not converged.
ratio_bootstrap <- function(b1, b3, cov2, draws, alpha) {
  root <- if (draws > 0 && all(is.finite(cov2))) {
    tryCatch(chol(cov2), error = function(e) NULL)
  }
  if (is.null(root)) return(c(NaN, NaN, NaN))
  sims <- matrix(rnorm(2 * draws), ncol = 2) %*% root
  s_base <- b1 + sims[, 1]
  ratios <- (s_base + b3 + sims[, 2]) / s_base
  c(sd(ratios), quantile(ratios, c(alpha / 2, 1 - alpha / 2), names = FALSE))
}

slope_table <- function(fit, panel, level, draws) {
  z_crit <- qnorm(1 - (1 - level) / 2)
  alpha <- 1 - level
  beta <- fixef(fit)$cond
  vc <- vcov(fit)$cond
  levels_v <- levels(panel$variant)
  slope <- job$slope_term
  if (!(slope %in% names(beta))) {
    stop(sprintf("the formula has no main effect %s; terms are: %s", slope,
                 paste(names(beta), collapse = ", ")))
  }
  inter <- interaction_name(names(beta), slope, paste0("variant", levels_v[2]))
  b1 <- unname(beta[slope]); b3 <- unname(beta[inter])
  v11 <- vc[slope, slope]; v33 <- vc[inter, inter]; v13 <- vc[slope, inter]
  se_base <- sqrt(v11)
  slope_ft <- b1 + b3
  se_ft <- sqrt(v11 + v33 + 2 * v13)
  ratio <- slope_ft / b1
  # Delta method for (b1 + b3) / b1 = 1 + b3 / b1: gradient (-b3 / b1^2, 1 / b1).
  g <- c(-b3 / b1^2, 1 / b1)
  se_ratio <- sqrt(drop(t(g) %*% matrix(c(v11, v13, v13, v33), 2) %*% g))
  set.seed(job$seed)
  boot <- ratio_bootstrap(b1, b3, matrix(c(v11, v13, v13, v33), 2), draws, alpha)
  data.frame(
    variant = c(levels_v[1], levels_v[2], "ratio", "ratio"),
    slope = c(b1, slope_ft, ratio, ratio),
    se = c(se_base, se_ft, se_ratio, boot[1]),
    ci_low = c(b1 - z_crit * se_base, slope_ft - z_crit * se_ft, ratio - z_crit * se_ratio, boot[2]),
    ci_high = c(b1 + z_crit * se_base, slope_ft + z_crit * se_ft, ratio + z_crit * se_ratio, boot[3]),
    method = c("wald", "wald", "delta", "bootstrap"),
    stringsAsFactors = FALSE)
}

variance_table <- function(fit) {
  vc <- VarCorr(fit)$cond
  groups <- names(vc)
  sds <- vapply(groups, function(g) unname(attr(vc[[g]], "stddev"))[1], numeric(1))
  data.frame(group = groups, variance = sds^2, sd = sds, stringsAsFactors = FALSE)
}

fit_one <- function(panel_path, out_dir) {
  dir.create(out_dir, showWarnings = FALSE, recursive = TRUE)
  panel <- read_panel(panel_path)
  for (key in c("formula", "dispersion")) {
    unknown <- setdiff(all.vars(as.formula(job[[key]])), names(panel))
    if (length(unknown)) {
      stop(sprintf("stats.%s names %s, which the panel does not have (its columns: %s)",
                   key, paste(unknown, collapse = ", "), paste(names(panel), collapse = ", ")),
           call. = FALSE)
    }
  }
  warnings_seen <- character(0)
  started <- proc.time()[["elapsed"]]
  fit <- tryCatch(
    withCallingHandlers(
      glmmTMB(as.formula(job$formula), dispformula = as.formula(job$dispersion),
              family = beta_family(link = "logit"), data = panel),
      warning = function(w) {
        warnings_seen <<- c(warnings_seen, conditionMessage(w))
        invokeRestart("muffleWarning")
      }),
    # TMB's own messages ("NA/NaN gradient evaluation", "infinite or missing values in 'x'") do
    # not say what to change; on a valid panel the cause is a model too rich for the data.
    error = function(e) {
      stop(sprintf(paste0(
        "glmmTMB could not fit formula '%s' with dispersion '%s' to %d rows (%s). On a valid ",
        "panel this means the model is too rich for this panel: spline terms (ns) in the ",
        "dispersion model and random effects with few levels are the usual causes. Simplify ",
        "stats.formula or stats.dispersion in the config, or use more prompts."),
        job$formula, job$dispersion, nrow(panel), conditionMessage(e)), call. = FALSE)
    })
  elapsed <- proc.time()[["elapsed"]] - started
  gradient <- fit$sdr$gradient.fixed
  max_gradient <- if (length(gradient)) max(abs(gradient)) else 0
  pd_hess <- isTRUE(fit$sdr$pdHess)
  optimizer_ok <- identical(as.integer(fit$fit$convergence), 0L)
  # The raw gradient's size depends on the parameters' scales; judge convergence the way lme4
  # does, on the gradient scaled by the Hessian's Cholesky factor (the remaining Newton step in
  # standard-error units), taking the smaller of scaled and raw per parameter.
  scaled <- tryCatch({
    hessian <- solve(fit$sdr$cov.fixed)
    max(pmin(abs(solve(chol(hessian), gradient)), abs(gradient)))
  }, error = function(e) NaN)
  convergence <- list(
    converged = pd_hess && optimizer_ok && is.finite(scaled) &&
      scaled < job$gradient_tolerance,
    pdHess = pd_hess,
    max_abs_gradient = max_gradient,
    max_scaled_gradient = scaled,
    gradient_tolerance = job$gradient_tolerance,
    optimizer_code = as.integer(fit$fit$convergence),
    optimizer_message = as.character(fit$fit$message),
    warnings = as.list(unique(warnings_seen)),
    log_likelihood = as.numeric(logLik(fit)),
    aic = AIC(fit),
    fit_seconds = elapsed,
    glmmTMB_version = as.character(packageVersion("glmmTMB")),
    R_version = as.character(getRversion()))
  write_tsv(coefficient_table(fit, job$confidence), file.path(out_dir, "coefficients.tsv"))
  write_tsv(slope_table(fit, panel, job$confidence, job$bootstrap), file.path(out_dir, "slopes.tsv"))
  write_tsv(variance_table(fit), file.path(out_dir, "variance_components.tsv"))
  write_json(convergence, file.path(out_dir, "convergence.json"), auto_unbox = TRUE,
             digits = NA, pretty = TRUE)
  if (isTRUE(job$save_model)) {
    # The identifiers travel with the model so the diagnostics can label their residuals.
    attr(fit, "canopy_ids") <- panel[, c("prompt_uid", "family", "variant", "task")]
    saveRDS(fit, file.path(out_dir, "model.rds"))
  }
}

# Run as a script (Rscript), not when sourced: the tests source this file to call its helpers.
if (sys.nframe() == 0L) {
  args <- commandArgs(trailingOnly = TRUE)
  if (length(args) != 1) stop("usage: Rscript fit_beta_glmm.R job.json")
  job <- fromJSON(args[1], simplifyVector = TRUE, simplifyDataFrame = FALSE)
  for (entry in job$jobs) {
    if (isTRUE(job$keep_going)) {
      # A refit on a resampled panel (length matching) may fail where the main fit did not: record
      # why in error.txt and go on with the next panel; the caller reports it.
      tryCatch(fit_one(entry$panel, entry$out_dir), error = function(e) {
        dir.create(entry$out_dir, showWarnings = FALSE, recursive = TRUE)
        writeLines(conditionMessage(e), file.path(entry$out_dir, "error.txt"))
      })
    } else {
      fit_one(entry$panel, entry$out_dir)
    }
  }
}
