/*
 * provisioning_guard: a Mosquitto 2.0 plugin (API v5) for the device-provisioning broker.
 *
 * Loaded once per listener (per_listener_settings true), with plugin_opt_listener naming it:
 *
 *   server        SUBSCRIBE is allowed only if the listener's acl_file lets the client READ
 *                 what the filter names (see subscribe_check); kick/reload control topic.
 *   operational   the same SUBSCRIBE check; nothing else (acl_file decides publish/read).
 *   provisioning  the whole ACL of birth certificates: username "CN=<id>" (the listener
 *                 sets use_subject_as_username) may write provisioning/<id>/request and
 *                 read/subscribe provisioning/<id>/response, nothing else.
 *
 * Control topic (server listener only; acl-server grants it to the server identity alone):
 *   $CONTROL/provisioning-guard/v1, payload lines "token T", "reload", "kick ID",
 *   "kick-birth ID".
 *   kick      disconnects every session of username ID and CN=ID (no last will);
 *   kick-birth  only those of CN=ID (the birth certificate's sessions).
 *   reload    raises SIGHUP in the broker (it re-reads conf, ACL files and CRLs at the top of
 *             its next loop); the kicks of the same message run in the reload event, so a
 *             kicked client can only reconnect against the new CRL and ACLs.
 *   When the message's work is done, "done T" is published on .../v1/response.
 *
 * Built against Debian's mosquitto-dev 2.0.11 and tested with its broker (tests/).
 */
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

/* The broker's own ACL check (exported by /usr/sbin/mosquitto, absent from the public
 * headers): runs the acl_file rules of the client's listener. */
int mosquitto_acl_check(struct mosquitto *context, const char *topic, uint32_t payloadlen,
		void *payload, uint8_t qos, bool retain, int access);

#define CONTROL_TOPIC "$CONTROL/provisioning-guard/v1"
#define RESPONSE_TOPIC "$CONTROL/provisioning-guard/v1/response"
#define MAX_ID 64
#define MAX_TOKEN 64
#define MAX_PENDING 100000
/* Stands for "any level" when a filter is checked as a topic; ACL topics never hold it
 * (acl_rules.py refuses control characters). */
#define ANY_LEVEL '\x01'

enum mode { MODE_SERVER, MODE_OPERATIONAL, MODE_PROVISIONING };

struct guard {
	mosquitto_plugin_id_t *pid;
	enum mode mode;
	char **pending_kicks;
	size_t kick_count;
	char **pending_tokens;
	size_t token_count;
};

int mosquitto_plugin_version(int count, const int *versions)
{
	for(int i = 0; i < count; i++){
		if(versions[i] == 5) return 5;
	}
	return -1;
}

/* The clientId grammar (agent/protocol.py CLIENT_ID_RE). */
static bool valid_id(const char *id, size_t len)
{
	if(len == 0 || len > MAX_ID) return false;
	for(size_t i = 0; i < len; i++){
		char c = id[i];
		bool alnum = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
		if(!alnum && (i == 0 || !strchr("_.:-", c))) return false;
	}
	return true;
}

/* May the client read what ``filter`` names? The filter is turned into a topic with
 * ANY_LEVEL for each wildcard level and checked with the listener's READ rules: a grant
 * must cover every topic the filter can match, so "#", another device's topics and
 * "$SYS/#" fail, "devices/<own id>/commands/#" passes. "$share/<group>/<f>" is judged
 * by <f>: a device may only share what it may read anyway (its own topics), so it cannot
 * join the server's groups. Delivery is still checked message by message. */
static int subscribe_check(struct mosquitto_evt_acl_check *ed)
{
	const char *filter = ed->topic;
	if(!strncmp(filter, "$share/", 7)){
		const char *slash = strchr(filter + 7, '/');
		if(slash == NULL || slash == filter + 7 || slash[1] == '\0') return MOSQ_ERR_ACL_DENIED;
		filter = slash + 1;
	}
	size_t len = strlen(filter);
	char *probe = malloc(len + 1);
	if(probe == NULL) return MOSQ_ERR_NOMEM;
	for(size_t i = 0; i < len; i++){
		char c = filter[i];
		if(c == '+' || c == '#'){
			bool whole = (i == 0 || filter[i-1] == '/') && (i + 1 == len || filter[i+1] == '/');
			if(!whole){
				free(probe);
				return MOSQ_ERR_ACL_DENIED;
			}
			c = ANY_LEVEL;
		}
		probe[i] = c;
	}
	probe[len] = '\0';
	int rc = mosquitto_acl_check(ed->client, probe, 0, NULL, ed->qos, false, MOSQ_ACL_READ);
	free(probe);
	return rc == MOSQ_ERR_SUCCESS ? MOSQ_ERR_SUCCESS : MOSQ_ERR_ACL_DENIED;
}

/* Birth certificates: username "CN=<id>" (a subject with only a CN, as the station signs). */
static int provisioning_check(struct mosquitto_evt_acl_check *ed)
{
	const char *user = mosquitto_client_username(ed->client);
	if(user == NULL || strncmp(user, "CN=", 3) || !valid_id(user + 3, strlen(user + 3))){
		return MOSQ_ERR_ACL_DENIED;
	}
	if(ed->access == MOSQ_ACL_UNSUBSCRIBE) return MOSQ_ERR_SUCCESS;
	char allowed[MAX_ID + 32];
	const char *suffix = ed->access == MOSQ_ACL_WRITE ? "request" : "response";
	snprintf(allowed, sizeof(allowed), "provisioning/%s/%s", user + 3, suffix);
	return strcmp(ed->topic, allowed) ? MOSQ_ERR_ACL_DENIED : MOSQ_ERR_SUCCESS;
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
	struct guard *guard = userdata;
	struct mosquitto_evt_acl_check *ed = event_data;
	(void)event;

	if(guard->mode == MODE_PROVISIONING) return provisioning_check(ed);
	if(ed->access == MOSQ_ACL_SUBSCRIBE) return subscribe_check(ed);
	return MOSQ_ERR_PLUGIN_DEFER; /* publish/read/unsubscribe: the acl_file decides */
}

/* ``entry`` is "o<id>" (operational and birth sessions) or "b<id>" (birth sessions only). */
static void kick(const char *entry)
{
	char birth[MAX_ID + 4];
	const char *id = entry + 1;
	snprintf(birth, sizeof(birth), "CN=%s", id);
	if(entry[0] == 'o') mosquitto_kick_client_by_username(id, false);
	mosquitto_kick_client_by_username(birth, false);
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "provisioning_guard: disconnected the %ssessions of %s",
			entry[0] == 'o' ? "" : "birth ", id);
}

static void respond(const char *token)
{
	char payload[MAX_TOKEN + 8];
	int len = snprintf(payload, sizeof(payload), "done %s", token);
	mosquitto_broker_publish_copy(NULL, RESPONSE_TOPIC, len, payload, 0, false, NULL);
}

static bool push(char ***list, size_t *count, const char *value)
{
	if(*count >= MAX_PENDING) return false;
	char **grown = realloc(*list, (*count + 1) * sizeof(char *));
	if(grown == NULL) return false;
	*list = grown;
	grown[*count] = strdup(value);
	if(grown[*count] == NULL) return false;
	(*count)++;
	return true;
}

/* "kick ID" -> "oID", "kick-birth ID" -> "bID"; false for anything else. */
static bool kick_entry(const char *line, char *entry, size_t size)
{
	const char *id;
	char kind;
	if(!strncmp(line, "kick ", 5)){
		id = line + 5;
		kind = 'o';
	}else if(!strncmp(line, "kick-birth ", 11)){
		id = line + 11;
		kind = 'b';
	}else{
		return false;
	}
	if(!valid_id(id, strlen(id))) return false;
	snprintf(entry, size, "%c%s", kind, id);
	return true;
}

static void clear(char ***list, size_t *count)
{
	for(size_t i = 0; i < *count; i++) free((*list)[i]);
	free(*list);
	*list = NULL;
	*count = 0;
}

static int on_control(int event, void *event_data, void *userdata)
{
	struct guard *guard = userdata;
	struct mosquitto_evt_control *ed = event_data;
	(void)event;

	char *text = strndup(ed->payload, ed->payloadlen);
	if(text == NULL) return MOSQ_ERR_NOMEM;
	char *token = NULL;
	bool reload = false;
	char *save = NULL;
	char **kicks = NULL;
	size_t kick_count = 0;
	char entry[MAX_ID + 2];
	for(char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)){
		if(!strncmp(line, "token ", 6) && valid_id(line + 6, strlen(line + 6))){
			token = line + 6;
		}else if(!strcmp(line, "reload")){
			reload = true;
		}else if(kick_entry(line, entry, sizeof(entry))){
			if(!push(&kicks, &kick_count, entry)) break;
		}else{
			mosquitto_log_printf(MOSQ_LOG_WARNING, "provisioning_guard: ignored a control line");
		}
	}
	if(reload){
		/* Mosquitto's own SIGHUP handler sets its reload flag; the reload runs before the
		 * broker reads any more packets, and on_reload finishes this message's work. */
		for(size_t i = 0; i < kick_count; i++){
			push(&guard->pending_kicks, &guard->kick_count, kicks[i]);
		}
		if(token) push(&guard->pending_tokens, &guard->token_count, token);
		raise(SIGHUP);
	}else{
		for(size_t i = 0; i < kick_count; i++) kick(kicks[i]);
		if(token) respond(token);
	}
	clear(&kicks, &kick_count);
	free(text);
	return MOSQ_ERR_SUCCESS;
}

static int on_reload(int event, void *event_data, void *userdata)
{
	struct guard *guard = userdata;
	(void)event;
	(void)event_data;

	for(size_t i = 0; i < guard->kick_count; i++) kick(guard->pending_kicks[i]);
	for(size_t i = 0; i < guard->token_count; i++) respond(guard->pending_tokens[i]);
	clear(&guard->pending_kicks, &guard->kick_count);
	clear(&guard->pending_tokens, &guard->token_count);
	return MOSQ_ERR_PLUGIN_DEFER; /* let other reload handlers run */
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **user_data,
		struct mosquitto_opt *options, int option_count)
{
	struct guard *guard = calloc(1, sizeof(*guard));
	if(guard == NULL) return MOSQ_ERR_NOMEM;
	guard->pid = identifier;
	const char *listener = NULL;
	for(int i = 0; i < option_count; i++){
		if(!strcmp(options[i].key, "listener")) listener = options[i].value;
	}
	if(listener && !strcmp(listener, "server")){
		guard->mode = MODE_SERVER;
	}else if(listener && !strcmp(listener, "operational")){
		guard->mode = MODE_OPERATIONAL;
	}else if(listener && !strcmp(listener, "provisioning")){
		guard->mode = MODE_PROVISIONING;
	}else{
		mosquitto_log_printf(MOSQ_LOG_ERR,
				"provisioning_guard: plugin_opt_listener must be server, operational or provisioning");
		free(guard);
		return MOSQ_ERR_INVAL;
	}
	*user_data = guard;
	int rc = mosquitto_callback_register(identifier, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, guard);
	if(rc == MOSQ_ERR_SUCCESS && guard->mode == MODE_SERVER){
		rc = mosquitto_callback_register(identifier, MOSQ_EVT_CONTROL, on_control, CONTROL_TOPIC, guard);
		if(rc == MOSQ_ERR_SUCCESS){
			rc = mosquitto_callback_register(identifier, MOSQ_EVT_RELOAD, on_reload, NULL, guard);
		}
	}
	mosquitto_log_printf(MOSQ_LOG_INFO, "provisioning_guard: loaded for the %s listener", listener);
	return rc;
}

int mosquitto_plugin_cleanup(void *user_data, struct mosquitto_opt *options, int option_count)
{
	struct guard *guard = user_data;
	(void)options;
	(void)option_count;

	if(guard == NULL) return MOSQ_ERR_SUCCESS;
	mosquitto_callback_unregister(guard->pid, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
	if(guard->mode == MODE_SERVER){
		mosquitto_callback_unregister(guard->pid, MOSQ_EVT_CONTROL, on_control, CONTROL_TOPIC);
		mosquitto_callback_unregister(guard->pid, MOSQ_EVT_RELOAD, on_reload, NULL);
	}
	clear(&guard->pending_kicks, &guard->kick_count);
	clear(&guard->pending_tokens, &guard->token_count);
	free(guard);
	return MOSQ_ERR_SUCCESS;
}
