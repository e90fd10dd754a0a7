# MLflow's tracking server with what its Postgres store and S3 artifacts need (the upstream image has neither
# psycopg2 nor boto3). Versions follow constraints.txt's mlflow and boto3.
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir psycopg2-binary==2.9.10 boto3==1.43.117
