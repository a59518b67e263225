output "http_function_url" {
  description = "HTTPS endpoint of caption_http. Callers send an identity token (Authorization: Bearer) and need roles/run.invoker."
  value       = google_cloudfunctions2_function.caption_http.service_config[0].uri
}

output "event_function_name" {
  description = "Name of the caption_on_upload function, for `gcloud functions logs read` and the console."
  value       = google_cloudfunctions2_function.caption_on_upload.name
}

output "watched_bucket_name" {
  description = "Bucket whose uploads are captioned (gs://NAME)."
  value       = local.watched_bucket
}

output "runtime_service_account_email" {
  description = "Service account both functions run as; grant it the module's object role on any further bucket by adding the bucket to allowed_buckets."
  value       = google_service_account.runtime.email
}

output "gemini_api_key_secret_id" {
  description = "Secret Manager secret that must receive the Gemini API key (`gcloud secrets versions add`), or null when gemini_mode is \"vertex\"."
  value       = local.use_api_key ? google_secret_manager_secret.gemini_api_key[0].secret_id : null
}
