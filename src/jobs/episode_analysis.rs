//! `episode_analysis`: analyses an episode once it is recorded (enqueued in the same transaction as
//! the episode), stores the result in `episodes.analysis` and appends `episode.analyzed`.
//!
//! The analysis itself is the registry's [`Analyzer`](crate::analysis::Analyzer): the deterministic
//! text analyzer by default. Keywords are ranked against the tenant's other recent episodes.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use super::{Job, JobContext, JobError};
use crate::analysis::Document;
use crate::db::episodes;
use crate::db::{DbError, events, tenant as scope};
use crate::domain::event_type::EventType;
use crate::domain::job::Queue;

/// The other episodes keywords are ranked against: the most recent ones, each cut to its start.
const CORPUS_EPISODES: i64 = 200;
const CORPUS_CHARS: i32 = 20_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpisodeAnalysis {
    pub episode_id: Uuid,
}

impl Job for EpisodeAnalysis {
    const KIND: &'static str = "episode_analysis";
    const QUEUE: Queue = Queue::Analysis;
    const MAX_ATTEMPTS: i32 = 5;
    const TIMEOUT: Duration = Duration::from_secs(120);

    async fn run(self, ctx: JobContext) -> Result<Value, JobError> {
        let tenant = ctx.tenant()?;
        let mut tx = scope::begin(ctx.db.primary(), tenant).await?;
        let episode = episodes::get(&mut tx, tenant, self.episode_id).await?;
        let Some(episode) = episode else {
            scope::end_read(tx);
            return Ok(json!({"skipped": "the episode no longer exists"}));
        };
        let corpus =
            episodes::corpus(&mut tx, tenant, episode.id, CORPUS_EPISODES, CORPUS_CHARS).await?;
        scope::end_read(tx);
        ctx.progress(20, "analysing").await?;

        let analyzer = ctx.services.analyzer.clone();
        let compared_with = corpus.len();
        // Off the async workers: the text analyzer is CPU work (up to a fraction of a second on a
        // large episode against a large corpus), and an analyzer that calls out still can.
        let runtime = tokio::runtime::Handle::current();
        let (title, content) = (episode.title.clone(), episode.content.clone());
        let work = analyzer.clone();
        let analysis = tokio::task::spawn_blocking(move || {
            let documents: Vec<Document<'_>> = corpus
                .iter()
                .map(|(title, content)| Document { title, content })
                .collect();
            let episode = Document {
                title: &title,
                content: &content,
            };
            runtime.block_on(work.analyze(episode, &documents))
        })
        .await
        .map_err(|e| JobError::retry(format!("analysis task: {e}")))?
        .map_err(|e| {
            if e.retryable {
                JobError::retry(format!("analysis: {e}"))
            } else {
                JobError::permanent(format!("analysis: {e}"))
            }
        })?;

        let mut tx = scope::begin(ctx.db.primary(), tenant).await?;
        if !episodes::set_analysis(&mut tx, tenant, episode.id, &analysis).await? {
            return Ok(json!({"skipped": "the episode no longer exists"}));
        }
        let data = json!({"episode_id": episode.id, "analysis": analysis});
        let event = events::append(
            &mut tx,
            tenant,
            &EventType::platform(EventType::EPISODE_ANALYZED),
            &data,
        )
        .await?;
        tx.commit().await.map_err(DbError::from)?;
        ctx.events.committed(std::slice::from_ref(&event)).await;
        Ok(json!({
            "episode_id": episode.id,
            "analyzer": analyzer.name(),
            "compared_with": compared_with,
        }))
    }
}
