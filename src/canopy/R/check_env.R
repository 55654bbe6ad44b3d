# Report which R packages the statistics stage needs are missing (one name per line on stdout).
# Exit status 0 either way: the Python caller turns the list into an error with install commands.
needed <- c("jsonlite", "splines", "glmmTMB")
for (pkg in needed) {
  if (!suppressWarnings(suppressMessages(requireNamespace(pkg, quietly = TRUE)))) {
    cat("MISSING ", pkg, "\n", sep = "")
  }
}
cat("DHARMA ", requireNamespace("DHARMa", quietly = TRUE), "\n", sep = "")
cat("R_VERSION ", as.character(getRversion()), "\n", sep = "")
if (requireNamespace("glmmTMB", quietly = TRUE)) {
  cat("GLMMTMB_VERSION ", as.character(packageVersion("glmmTMB")), "\n", sep = "")
}
