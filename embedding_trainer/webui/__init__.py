"""The AUTOMATIC1111 WebUI glue: training runs, the HTTP API and the training tab."""
