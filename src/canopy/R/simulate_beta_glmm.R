# Simulate responses from a fitted glmmTMB Beta model: at its own rows (residual diagnostics) or
# at new rows (the power planner's larger panels).
#
# Usage: Rscript simulate_beta_glmm.R job.json
#
# job.json, diagnostics (no "designs" key): model (model.rds path), nsim, seed, out_dir,
# use_dharma (bool). Writes into out_dir:
#   fitted.tsv        prompt_uid, family, variant, task, observed, predicted (response scale; random effects included, as
#                     DHARMa's fitted values for glmmTMB), predicted_population (random
#                     effects at zero)
#   simulated.f64     nsim x n doubles, little-endian, simulation-major: simulate(fit, nsim)
#                     (glmmTMB draws new random effects in every simulation, DHARMa's default)
#   info.json         n, nsim, seed, engine ("canopy" or "DHARMa")
# and, when DHARMa is requested and installed, dharma_residuals.tsv and dharma_tests.json
# computed by DHARMa itself.
#
# job.json, new rows: model, slope_term, effects ({name: coefficient of the slope-by-variant
# interaction, or null for the fitted one}), designs (list of {design: TSV path, out: TSV path,
# seed}). A design holds the model's covariates (R_sc, invN_sc, ... on the fit's
# standardisation) and its grouping columns, whose levels may be new. Each out TSV gets one
# column D_<name> per effect: one draw per row from the fitted model with that interaction
# coefficient, the random effects of the design's levels drawn anew once per design and shared
# by its effects. glmmTMB 1.1.5 (Debian 12) has no simulate() at new data, so this draws what its
# unconditional simulate() draws (new random intercepts, then Beta(mu phi, (1 - mu) phi)) from
# predict() at the new rows, which evaluates the fit's data-dependent bases (ns knots) as fitted;
# a test compares the two at the fitted rows.

suppressPackageStartupMessages({
  library(jsonlite)
  library(splines)
  library(glmmTMB)
})

simulate_fitted <- function(job, fit) {
  observed <- model.response(model.frame(fit))
  predicted <- predict(fit, type = "response")
  # Population-level fitted values (random effects at zero): the centre for the dispersion test,
  # whose unconditional simulations also draw new random effects.
  population <- predict(fit, type = "response", re.form = NA)
  set.seed(job$seed)
  sims <- as.matrix(simulate(fit, nsim = job$nsim, seed = job$seed))
  if (nrow(sims) != length(observed)) stop("simulate() returned a wrong number of rows")

  ids <- attr(fit, "canopy_ids")
  if (is.null(ids) || nrow(ids) != length(observed)) {
    stop("model.rds lacks the panel identifiers: refit it with canopy.stats.fit_beta_glmm")
  }
  ids[] <- lapply(ids, as.character)
  write.table(data.frame(ids, observed = observed, predicted = predicted,
                         predicted_population = population),
              file.path(job$out_dir, "fitted.tsv"), sep = "\t", quote = FALSE, row.names = FALSE)
  # Column-major n x nsim matrix == simulation-major stream of nsim blocks of n values.
  con <- file(file.path(job$out_dir, "simulated.f64"), "wb")
  writeBin(as.double(sims), con, size = 8, endian = "little")
  close(con)

  engine <- "canopy"
  if (isTRUE(job$use_dharma) && requireNamespace("DHARMa", quietly = TRUE)) {
    engine <- "DHARMa"
    res <- DHARMa::createDHARMa(simulatedResponse = sims, observedResponse = observed,
                                fittedPredictedResponse = predicted, integerResponse = FALSE,
                                seed = job$seed)
    uniformity <- DHARMa::testUniformity(res, plot = FALSE)
    dispersion <- DHARMa::testDispersion(res, plot = FALSE, alternative = "two.sided")
    outliers <- DHARMa::testOutliers(res, plot = FALSE, type = "binomial",
                                     alternative = "two.sided")
    write.table(data.frame(row = seq_along(observed) - 1L, scaled_residual = res$scaledResiduals),
                file.path(job$out_dir, "dharma_residuals.tsv"), sep = "\t", quote = FALSE,
                row.names = FALSE)
    write_json(list(
      uniformity = list(statistic = unname(uniformity$statistic), p_value = uniformity$p.value),
      dispersion = list(statistic = unname(dispersion$statistic), p_value = dispersion$p.value),
      outliers = list(statistic = unname(outliers$statistic[1]), p_value = outliers$p.value)),
      file.path(job$out_dir, "dharma_tests.json"), auto_unbox = TRUE, digits = NA)
  }
  write_json(list(n = length(observed), nsim = job$nsim, seed = job$seed, engine = engine),
             file.path(job$out_dir, "info.json"), auto_unbox = TRUE, digits = NA)
}

# The design's factors with the fitted model's levels (and contrasts' reference levels); grouping
# factors keep their own, possibly new, levels.
design_frame <- function(fit, path) {
  design <- read.delim(path, sep = "\t", quote = "", na.strings = c("NaN", "NA", ""),
                       colClasses = c(prompt_uid = "character", family = "character",
                                      variant = "character", task = "character"),
                       check.names = FALSE)
  for (column in names(fit$frame)) {
    if (is.factor(fit$frame[[column]]) && column %in% names(design)) {
      unknown <- setdiff(unique(design[[column]]), levels(fit$frame[[column]]))
      if (length(unknown) && !(column %in% names(VarCorr(fit)$cond))) {
        stop(sprintf("design column %s has levels the fit never saw: %s", column,
                     paste(unknown, collapse = ", ")))
      }
      design[[column]] <- factor(design[[column]], levels = union(levels(fit$frame[[column]]),
                                                                  unique(design[[column]])))
    }
  }
  design
}

# Random intercepts of the conditional model drawn anew for the design's levels: the
# unconditional draws of glmmTMB's simulate(). Only (1 | g) terms have a meaning at new levels
# without their covariates' distribution, so anything else stops here, naming the term.
random_intercepts <- function(fit, design) {
  components <- VarCorr(fit)$cond
  total <- numeric(nrow(design))
  for (group in names(components)) {
    block <- components[[group]]
    if (!identical(dim(block), c(1L, 1L)) || rownames(block) != "(Intercept)") {
      stop(sprintf(paste0("the power planner simulates random intercepts (1 | group) only; ",
                          "the formula has a random term of %s with %s"), group,
                   paste(rownames(block), collapse = ", ")), call. = FALSE)
    }
    levels_g <- unique(as.character(design[[group]]))
    effect <- rnorm(length(levels_g), 0, attr(block, "stddev")[[1]])
    total <- total + effect[match(as.character(design[[group]]), levels_g)]
  }
  total
}

simulate_designs <- function(job, fit) {
  beta <- fixef(fit)$cond
  source_dir <- dirname(sub("^--file=", "", grep("^--file=", commandArgs(FALSE), value = TRUE)))
  # interaction_name() is the fit's own way of finding the slope-by-variant term.
  fit_env <- new.env()
  sys.source(file.path(source_dir, "fit_beta_glmm.R"), envir = fit_env)
  second <- levels(fit$frame$variant)[2]
  inter <- fit_env$interaction_name(names(beta), job$slope_term, paste0("variant", second))
  par <- fit$fit$par
  position <- which(names(par) == "beta")[match(inter, names(beta))]
  designs <- lapply(job$designs, function(entry) design_frame(fit, entry$design))
  # One predict() per quantity over all designs together: each call builds a TMB object, which
  # costs far more than the rows it predicts.
  stacked <- do.call(rbind, designs)
  which_design <- rep(seq_along(designs), vapply(designs, nrow, integer(1)))
  phi <- split(predict(fit, newdata = stacked, type = "disp", allow.new.levels = TRUE),
               which_design)
  eta <- lapply(job$effects, function(coefficient) {
    params <- par
    if (!is.null(coefficient)) params[position] <- coefficient
    split(predict(fit, newdata = stacked, re.form = NA, type = "link", newparams = params,
                  allow.new.levels = TRUE), which_design)
  })
  for (i in seq_along(designs)) {
    set.seed(job$designs[[i]]$seed)
    shared <- random_intercepts(fit, designs[[i]])
    out <- data.frame(row = seq_len(nrow(designs[[i]])) - 1L)
    for (name in names(job$effects)) {
      mu <- plogis(eta[[name]][[i]] + shared)
      out[[paste0("D_", name)]] <- rbeta(length(mu), mu * phi[[i]], (1 - mu) * phi[[i]])
    }
    write.table(out, job$designs[[i]]$out, sep = "\t", quote = FALSE, row.names = FALSE)
  }
}

args <- commandArgs(trailingOnly = TRUE)
if (length(args) != 1) stop("usage: Rscript simulate_beta_glmm.R job.json")
job <- fromJSON(args[1], simplifyVector = TRUE, simplifyDataFrame = FALSE)
fit <- readRDS(job$model)
if (is.null(job$designs)) {
  dir.create(job$out_dir, showWarnings = FALSE, recursive = TRUE)
  simulate_fitted(job, fit)
} else {
  simulate_designs(job, fit)
}
