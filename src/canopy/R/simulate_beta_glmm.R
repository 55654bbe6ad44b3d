# Simulate responses from a fitted glmmTMB model for residual diagnostics.
#
# Usage: Rscript simulate_beta_glmm.R job.json
#
# job.json: model (model.rds path), nsim, seed, out_dir, use_dharma (bool).
#
# Writes into out_dir:
#   fitted.tsv        prompt_uid, family, variant, task, observed, predicted (response scale; random effects included, as
#                     DHARMa's fitted values for glmmTMB), predicted_population (random
#                     effects at zero)
#   simulated.f64     nsim x n doubles, little-endian, simulation-major: simulate(fit, nsim)
#                     (glmmTMB draws new random effects in every simulation, DHARMa's default)
#   info.json         n, nsim, seed, engine ("canopy" or "DHARMa")
# and, when DHARMa is requested and installed, dharma_residuals.tsv and dharma_tests.json
# computed by DHARMa itself.

suppressPackageStartupMessages({
  library(jsonlite)
  library(splines)
  library(glmmTMB)
})

args <- commandArgs(trailingOnly = TRUE)
if (length(args) != 1) stop("usage: Rscript simulate_beta_glmm.R job.json")
job <- fromJSON(args[1], simplifyVector = TRUE)
dir.create(job$out_dir, showWarnings = FALSE, recursive = TRUE)

fit <- readRDS(job$model)
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
