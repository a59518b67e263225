# ---------------------------------------------------------------------------
# The daily budget: a count of the uploads it turned away, and an alert on it
# ---------------------------------------------------------------------------

# Every image the daily budget turns away logs one line with jsonPayload.reason
# "budget-exhausted" (src/captioner/edges/logs.py, log_result). A counter metric of those
# lines (https://cloud.google.com/logging/docs/logs-based-metrics/counter-metrics) is what
# the alert watches; the metric's name is what Cloud Monitoring shows as
# logging.googleapis.com/user/<name>.
resource "google_logging_metric" "budget_exhausted" {
  count = local.use_budget ? 1 : 0

  project     = var.project_id
  name        = "${var.name_prefix}-budget-exhausted"
  description = "Images captioner left uncaptioned because the day's CAPTION_DAILY_BUDGET_USD was spent."
  filter      = "resource.type=\"cloud_run_revision\" AND jsonPayload.reason=\"budget-exhausted\""

  metric_descriptor {
    metric_kind = "DELTA"
    value_type  = "INT64"
    unit        = "1"
  }

  depends_on = [google_project_service.enabled]
}

# An incident as soon as one image is turned away in a day: budget notifications of
# Cloud Billing lag by hours and cannot stop anything, this says it has stopped.
resource "google_monitoring_alert_policy" "budget_exhausted" {
  count = local.use_budget ? 1 : 0

  project               = var.project_id
  display_name          = "${var.name_prefix}: daily caption budget spent"
  combiner              = "OR"
  notification_channels = var.alert_notification_channels

  conditions {
    display_name = "images left uncaptioned by the daily budget"

    condition_threshold {
      filter          = "metric.type=\"logging.googleapis.com/user/${google_logging_metric.budget_exhausted[0].name}\" AND resource.type=\"cloud_run_revision\""
      comparison      = "COMPARISON_GT"
      threshold_value = 0
      duration        = "0s"

      aggregations {
        alignment_period   = "300s"
        per_series_aligner = "ALIGN_SUM"
      }
    }
  }

  documentation {
    content   = "captioner's daily budget (CAPTION_DAILY_BUDGET_USD) is spent: new uploads are acknowledged and left uncaptioned. Run `captioner backfill gs://BUCKET/` after midnight UTC to caption them, or raise the budget."
    mime_type = "text/markdown"
  }

  depends_on = [google_project_service.enabled]
}
