"""Append-only result file: one JSON line per finished run, written and synced at once.

A rerun reads the file and skips every run whose key is already there, so an interrupted study
loses at most the runs that were in flight. A line cut short by a crash is ignored.
"""
import json
import os


class ResultStore:
    def __init__(self, path: str):
        self.path = path
        self.records = {}
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short by an interruption
                    self.records[record["key"]] = record

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def get(self, key: str):
        return self.records.get(key)

    def append(self, record: dict):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        line = json.dumps(record, separators=(",", ":"))
        with open(self.path, "a+") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:  # start on a fresh line even after a torn write
                f.seek(f.tell() - 1)
                if f.read(1) != "\n":
                    f.write("\n")
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[record["key"]] = record
